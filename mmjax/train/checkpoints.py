"""Checkpoints: the Orbax manager of a run, and `load_run`, the one way to read another run.

A run's workdir holds `config.json` (the config it used) and `checkpoints/<step>/`,
each an Orbax composite of `state` (the `TrainState`) and `data` (each process's
Grain iterator position). Orbax writes a checkpoint to a temporary directory and
renames it when complete, so a checkpoint is never half-written.
"""
import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The checkpoint manager of `<workdir>/checkpoints`, keeping the last `keep`."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           save_interval_steps=1))


def save(mngr: ocp.CheckpointManager, step: int, state, train_iter):
  """Saves the train state and the data iterator's position (asynchronously)."""
  mngr.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)))


def restore(mngr: ocp.CheckpointManager, step: int, state, train_iter=None):
  """The state saved at `step`, laid out (shapes, dtypes, shardings) like `state`.

  With `train_iter`, the data iterator is moved to where it was too. Raises a
  ValueError that says what to do when the saved tree does not fit `state`.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  args = {"state": ocp.args.StandardRestore(abstract)}
  if train_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(train_iter)
  try:
    return mngr.restore(step, args=ocp.args.Composite(**args)).state
  except ValueError as e:
    raise ValueError(
        f"The checkpoint at step {step} in {mngr.directory} does not fit this config's "
        f"model and optimizer (was it written by another experiment?). Use a new "
        f"--workdir, or the config that wrote it.") from e


def read_config(workdir: str) -> dict:
  """The config an earlier run wrote into its workdir, as a dict."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class Run:
  """An earlier run, as another one reads it: its config, step, parameters and extras."""
  workdir: str
  config: dict
  step: int
  params: Any  # Arrays on this process's first device.
  extras: Any


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
  checkpointer = ocp.StandardCheckpointer()
  item = os.path.join(directory, str(step), "state")
  metadata = checkpointer.metadata(item)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          metadata)
  state = checkpointer.restore(item, abstract)
  checkpointer.close()
  return Run(workdir=workdir, config=config, step=int(step), params=state["params"],
             extras=state["extras"])
