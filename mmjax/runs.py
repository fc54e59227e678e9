"""Reading another run: its config, step, parameters and extras (`load_run`).

For an experiment that starts from another (a VLM from a CLIP run's image tower, a
diffusion model from its autoencoder, a sampler judged by a classifier). A run's
workdir holds `config.json` (the config it used) and `checkpoints/<step>/`, each an
Orbax composite whose `state` item holds the `TrainState`.
"""
import dataclasses
import json
import os
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from mmjax import lora


def read_config(workdir: str) -> dict:
  """The config an earlier run wrote into its workdir, as a dict."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def state_metadata(item: str):
  """The array metadata (shape, dtype) tree of a checkpoint's `state` item (the
  directory `checkpoints/<step>/state`), or None where it has none."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(item))
  finally:
    handler.close()
  return getattr(metadata, "tree", metadata)


def restore_state(item: str, abstract):
  """The `state` item at `item`, restored to `abstract`'s shapes, dtypes and shardings."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(epath.Path(item), args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
  finally:
    handler.close()


@dataclasses.dataclass(frozen=True)
class Run:
  """An earlier run, as another one reads it: its config, step, parameters and extras."""
  workdir: str
  config: dict
  step: int
  params: Any  # Arrays on this process's first device.
  extras: Any

  def field(self, name: str):
    """The value of a dotted config field ("model.text_width") of this run.

    Raises a ValueError naming the field when the run's config.json has none (a run
    written by an older mmjax, whose config lacked it).
    """
    value = self.config
    for part in name.split("."):
      if not isinstance(value, dict) or part not in value:
        raise ValueError(f"{os.path.join(self.workdir, 'config.json')} has no field {name!r}: "
                         f"it was written by an older mmjax. Train that run again.")
      value = value[part]
    return value

  def merged(self, tree=None):
    """`tree` (default: the parameters; an EMA from `extras`) with this run's LoRA
    adapters folded into their kernels (mmjax/lora.py): the plain tree that exporters
    and other runs take. Unchanged for a run without LoRA."""
    tree = self.params if tree is None else tree
    spec = lora.spec_from_config(self.config)
    return lora.merge(tree, spec.scale) if spec else tree


def load_run(workdir: str, *, task: str | None = None, field: str = "workdir",
             step: int | None = None) -> Run:
  """Reads the latest (or the given) checkpoint of the run in `workdir`.

  For an experiment that starts from another (a VLM from a CLIP run's image tower, a
  diffusion model from its autoencoder, a sampler judged by a classifier). Whatever
  device layout the run was saved from, the arrays land on this process's first device.

  Args:
    workdir: the other run's --workdir.
    task: the `config.task` that run must have (e.g. "clip"), or None for any.
    field: the config field that named `workdir`, for the error messages.
    step: a checkpoint step; None for the latest.

  Raises:
    FileNotFoundError: no finished run there (no config.json or no checkpoint).
    ValueError: the run is of another task.
  """
  path = os.path.join(workdir or "", "config.json")
  if not workdir or not os.path.exists(path):
    raise FileNotFoundError(
        f"config.{field}={workdir!r} holds no run (no {path}). Train that run first "
        f"(see the experiment's docstring) or point config.{field} at its workdir.")
  config = read_config(workdir)
  if task is not None and config.get("task") != task:
    raise ValueError(f"config.{field}={workdir!r} is a {config.get('task')!r} run; a "
                     f"{task!r} run is needed here.")
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  mngr = ocp.CheckpointManager(directory)
  step = mngr.latest_step() if step is None else step
  mngr.close()
  if step is None:
    raise FileNotFoundError(f"config.{field}={workdir!r} has no checkpoint in {directory}: "
                            f"let that run finish (or save one) first.")
  item = os.path.join(directory, str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          state_metadata(item))
  state = restore_state(item, abstract)
  return Run(workdir=workdir, config=config, step=int(step), params=state["params"],
             extras=state["extras"])
