"""The device mesh and the shardings of the trainer: data parallelism over `data`."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device the job sees (all processes), axis `data`.

  The axis is Auto (not Explicit, `jax.make_mesh`'s default in JAX 0.10): the
  compiler propagates shardings, so model code needs no sharding annotations.
  """
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split along `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = "global_batch_size"):
  """Raises a ValueError, before anything compiles, if the batch does not split evenly."""
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    lower = max(n, global_batch_size // n * n)
    raise ValueError(
        f"config.{name}={global_batch_size} does not divide evenly over the {n} devices "
        f"({jax.process_count()} process(es)); set it to a multiple of {n}, e.g. "
        f"--config.{name}={lower} or {lower + n}.")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded along `data`."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def step_batch(local_batch: dict[str, np.ndarray], mesh: Mesh):
  """This process's rows of a global batch -> the argument of a step jitted with
  `in_shardings=batch_sharded(mesh)`.

  In a single process the NumPy arrays go in as they are: jit places them by its
  in_shardings in C++, about 15 us a batch, where `global_batch` (Python's
  `make_array_from_process_local_data`) took about 200 us on a 2-core CPU, 3% of
  LeNet-5's step. Across processes each holds only its rows, so they become global
  arrays first.
  """
  if jax.process_count() == 1:
    return local_batch
  return global_batch(local_batch, mesh)
