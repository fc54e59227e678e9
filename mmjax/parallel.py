"""The device mesh and the shardings every part of a run uses: a 2-D mesh (`data`, `fsdp`).

The batch splits over both axes (every device gets its own rows). Parameters and
optimizer state split along `fsdp` by one rule, `param_spec`: each large enough leaf
along its largest axis that the `fsdp` size divides; everything else is replicated.
With `fsdp=1` (the default) this is plain data parallelism. XLA's sharding
propagation inserts the all-gathers and reduce-scatters; models carry no sharding
annotations.
"""
import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)


def mesh_shape(spec: Mapping[str, int] | None, num_devices: int) -> tuple[int, int]:
  """config.mesh (e.g. {"data": -1, "fsdp": 4}) -> (data, fsdp) sizes over `num_devices`.

  One axis may be -1: whatever the other leaves. Raises ValueError, saying what to
  set, for unknown axes or sizes whose product is not the device count.
  """
  spec = dict(spec or {})
  unknown = set(spec) - set(AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; its axes are "
                     f"{list(AXES)}, e.g. --config.mesh.fsdp=4.")
  sizes = [int(spec.get(DATA, -1)), int(spec.get(FSDP, 1))]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={spec}: give each axis a size >= 1, or -1 to one of them "
                     f"(the rest of the {num_devices} devices).")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"config.mesh={spec}: {known} does not divide the {num_devices} "
                       f"devices; use a divisor of {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh={spec} covers {math.prod(sizes)} devices, but the job has "
                     f"{num_devices}; make data x fsdp = {num_devices} (or set one to -1).")
  return tuple(sizes)


def make_mesh(devices=None, shape: Mapping[str, int] | None = None) -> Mesh:
  """A 2-D mesh (`data`, `fsdp`) over `devices` (default: every device of every process).

  `shape` is config.mesh; default: all devices along `data`. The axes are Auto (not
  Explicit, `jax.make_mesh`'s default in JAX 0.10): the compiler propagates
  shardings, so model code needs no sharding annotations.
  """
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(shape, len(devices))
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(sizes, AXES, axis_types=(auto, auto), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch splits over: `data` and `fsdp`, those the mesh has."""
  return tuple(a for a in AXES if a in mesh.axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data` x `fsdp`, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """The FSDP rule: a leaf of `shape` splits along its largest axis that `fsdp`
  divides (the first such if several are as large), if it has >= `min_size` elements;
  otherwise (small, or no axis divisible) it is replicated."""
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  axis = -max(candidates)[1]
  return P(*([None] * axis + [FSDP]))


def state_sharding(tree, mesh: Mesh, min_size: int):
  """Shardings of a train state (arrays or ShapeDtypeStructs) by `param_spec`: the
  parameters, their optimizer moments (same shapes, same rule) and the extras along
  `fsdp`; scalars and small leaves replicated."""
  fsdp = mesh.shape.get(FSDP, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp, min_size)),
                      tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = "global_batch_size",
                     accum_steps: int = 1):
  """Raises a ValueError, before anything compiles, if the batch (each of its
  `accum_steps` micro-batches) does not split evenly over the devices."""
  n = mesh.devices.size
  unit = n * accum_steps
  if global_batch_size <= 0 or global_batch_size % unit:
    lower = max(unit, global_batch_size // unit * unit)
    why = (f"into {accum_steps} micro-batches (config.grad_accum_steps) each divisible by "
           f"the {n} devices" if accum_steps > 1 else f"evenly over the {n} devices")
    raise ValueError(
        f"config.{name}={global_batch_size} does not split {why} ({jax.process_count()} "
        f"process(es)); set it to a multiple of {unit}, e.g. --config.{name}={lower} or "
        f"{lower + unit}.")


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays split over `data` x `fsdp`."""
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
