"""Checkpoints of the run being trained: its Orbax manager, saving and restoring.

A run's workdir holds `config.json` (the config it used) and `checkpoints/<step>/`,
each an Orbax composite of `state` (the `TrainState`), `data` (each process's Grain
iterator position) and `config` (the config in force, as JSON: what a restart is
checked against). Orbax writes a checkpoint to a temporary directory and
renames it when complete, so a checkpoint is never half-written.

What can still go wrong is handled here too: `WorkdirLock` keeps a second run off a
workdir; `restore_latest` moves a checkpoint that cannot be restored, or that holds
non-finite values, to `checkpoints/corrupt-<step>/` and resumes from the one before.
"""
import json
import logging
import os
import socket

import filelock
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmjax import runs


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir's lock file."""


class CorruptCheckpointError(RuntimeError):
  """No checkpoint of a workdir could be restored."""


class WorkdirLock:
  """`<workdir>/lock`, held by process 0 while a run trains: {"host": ..., "pid": ...}.

  The lock itself is an OS file lock (`filelock`) on `<workdir>/lock.flock`, which the
  system releases when its process ends, however it ends; `lock` names the holder. A
  second run on the workdir raises WorkdirLocked naming that holder, and so does a
  second `WorkdirLock` in the same process (it is not re-entrant). A `lock` left by a
  killed run is taken over with a warning.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    self._flock = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    flock = filelock.FileLock(f"{self.path}.flock", timeout=0)
    try:
      flock.acquire()
    except filelock.Timeout:
      holder = self._holder() or {}
      raise WorkdirLocked(
          f"{os.path.dirname(self.path)} is in use by PID {holder.get('pid', '?')} on host "
          f"{holder.get('host', '?')} (lock file {self.path}). Wait for that run or stop "
          f"it, or use another --workdir.") from None
    self._flock = flock
    left = self._holder()
    if left is not None:
      logging.warning("Taking over %s: its process %s on %s has ended.", self.path,
                      left.get("pid"), left.get("host"))
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    tmp = f"{self.path}.{me['pid']}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(me, f)
    os.replace(tmp, self.path)  # Never half-written.
    return self

  def _holder(self) -> dict | None:
    """The contents of `lock`: the holder's host and PID; None if there is none."""
    try:
      with open(self.path, encoding="utf-8") as f:
        holder = json.load(f)
    except FileNotFoundError:
      return None
    except ValueError:
      return {}
    return holder if isinstance(holder, dict) else {}

  def __exit__(self, *exc):
    if self._flock is not None:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self._flock.release()
      self._flock = None


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The `state` item's handler: Orbax's, with replica-parallel saving off.

  Replica-parallel saving (Orbax's default off GPU) splits each replicated array among
  its replicas, which compiles a slicing program per array shape at a process's first
  save: seconds for a small CLIP, over a minute for a tree of 180 shapes on 8 CPU
  devices, where this handler's first save takes under a second
  (benchmarks/checkpoint_save.py). Without it, each array's first replica writes it,
  as Orbax does on GPUs."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The checkpoint manager of `<workdir>/checkpoints`, keeping the last `keep`."""
  handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state = _state_handler()
  handlers.add("state", ocp.args.PyTreeSave, state)
  handlers.add("state", ocp.args.PyTreeRestore, state)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           save_interval_steps=1),
      handler_registry=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state, train_iter, config=None):
  """Saves the train state, the data iterator's position and (given) the config as
  `config.json` holds it (asynchronously)."""
  items = dict(state=ocp.args.PyTreeSave(state),
               data=grain.checkpoint.CheckpointSave(train_iter))
  if config is not None:
    items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
  mngr.save(step, force=True, args=ocp.args.Composite(**items))


def saved_config(mngr: ocp.CheckpointManager, step: int) -> tuple[dict | None, str]:
  """(config, where) saved with the checkpoint at `step`: None for a checkpoint
  without one (written by an older mmjax) or whose copy cannot be read."""
  where = os.path.join(str(mngr.directory), str(step), "config")
  if not os.path.isdir(where):
    return None, where
  try:
    config = mngr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config
  except Exception as e:  # pylint: disable=broad-except  # Orbax errors vary.
    logging.warning("The config saved with checkpoint %d (%s) cannot be read: %s", step,
                    where, e)
    return None, where
  return (config if isinstance(config, dict) else None), where


def _shapes(tree) -> list[tuple]:
  return sorted(tuple(getattr(x, "shape", ()) or ()) for x in jax.tree.leaves(tree))


def restore(mngr: ocp.CheckpointManager, step: int, state, train_iter=None):
  """The state saved at `step`, laid out (shapes, dtypes, shardings) like `state`.

  With `train_iter`, the data iterator is moved to where it was too. Raises a
  ValueError that says what to do when the saved tree's array shapes differ from
  `state`'s (another experiment's checkpoint); any other failure (a missing or
  truncated file) is raised as it is.
  """
  item = os.path.join(str(mngr.directory), str(step), "state")
  metadata = runs.state_metadata(item)
  if metadata is None or not jax.tree.leaves(metadata):
    raise FileNotFoundError(f"{item} has no readable metadata (_METADATA missing?)")
  if _shapes(metadata) != _shapes(state):
    raise ValueError(
        f"The checkpoint at step {step} in {mngr.directory} does not fit this config's "
        f"model and optimizer (was it written by another experiment, or with another "
        f"config.optimizer.flatten?). Use a new "
        f"--workdir, or the config that wrote it.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  args = {"state": ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))}
  if train_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(train_iter)
  return mngr.restore(step, args=ocp.args.Composite(**args)).state


@jax.jit
def all_finite(tree) -> jax.Array:
  """One boolean: no float leaf of `tree` holds a NaN or an infinity.

  It is whether the float32 sum of every element is finite: a NaN or an infinity
  anywhere makes the sum NaN or infinite, and a sum is one small kernel per leaf (the
  train step checks its whole new state with it). Finite values whose sum overflows
  float32 (|sum| > 3.4e38) count as not finite; `exactly_finite` tells them apart.
  Over 600 leaves on two CPU cores `exactly_finite` compiled in 16.3 s and ran in 5.3
  ms, this in 5.2 s and 3.5 ms (benchmarks/finite_check.py).
  """
  sums = [jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.isfinite(sum(sums)) if sums else jnp.array(True)


@jax.jit
def exactly_finite(tree) -> jax.Array:
  """One boolean: every element of every float leaf of `tree` is finite (no overflow)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def restore_latest(mngr: ocp.CheckpointManager, state, train_iter=None, *,
                   move_corrupt: bool = True):
  """(state, step) of the newest checkpoint that restores and is finite; (state, None)
  if there is none.

  A newer checkpoint that fails (missing `_METADATA`, a truncated or deleted array
  file, NaN/Inf inside) is moved to `checkpoints/corrupt-<step>/` (when `move_corrupt`)
  with a warning naming the error, and the one before is tried. Raises ValueError if
  the saved tree belongs to another model, CorruptCheckpointError if even the oldest
  checkpoint fails (it is left in place).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      restored = restore(mngr, step, state, train_iter)
      if not bool(all_finite(restored)) and not bool(exactly_finite(restored)):
        raise FloatingPointError("it holds NaN or Inf values")
      if i:
        mngr.reload()  # Forget the moved steps.
      return restored, step
    except ValueError as e:
      if "another experiment" in str(e):
        raise
      error = e
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore errors vary.
      error = e
    what = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if i == len(steps) - 1:
      raise CorruptCheckpointError(
          f"The checkpoint at step {step} in {mngr.directory} cannot be restored ({what}) "
          f"and there is no earlier one. Move it away to start over, or use a new "
          f"--workdir.") from error
    where = "left in place"
    if move_corrupt and jax.process_index() == 0:
      dest = os.path.join(str(mngr.directory), f"corrupt-{step}")
      while os.path.exists(dest):
        dest += "-again"
      os.rename(os.path.join(str(mngr.directory), str(step)), dest)
      where = f"moved to {dest}"
    logging.warning("Checkpoint %d in %s cannot be restored (%s); %s. Resuming from step "
                    "%d instead.", step, mngr.directory, what, where, steps[i + 1])
  return state, None
