"""The one generic trainer: data-parallel training, evaluation, checkpoints, metrics.

What differs between experiments lives in a *task* (see `mmjax/tasks/`), which the
trainer uses through these members and nothing else:

  task.train_dataset(sharding)          -> grain.IterDataset of this process's batches
  task.init(rng)                        -> (params, extras)
  task.loss(params, extras, batch, rng) -> (loss, (metrics, new_extras))
  task.evaluate(state)                  -> {"eval/...": float}    (every process calls it)
  task.weight_decay_mask(params)        -> pytree of bools, or None
  task.after_update(state)              -> state (optional: EMA and the like)

`evaluate` may also return images, uint8 arrays [n, height, width, channels]: they go
to TensorBoard and to `<workdir>/images/<name>_<step>.png` (n images side by side).

The train step is one `jax.jit` over a mesh of every device of every process:
parameters and optimizer state replicated, the batch split along the `data` axis,
the state donated. The same config gives the same losses on any number of devices.
"""
import logging
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import PIL.Image
from clu import periodic_actions

import grain
from mmjax.data import pipeline
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim
from mmjax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: saved whole in every checkpoint."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extras: Any  # Task-owned collections: EMA weights, batch statistics; {} if none.


class _SigtermFlag:
  """Remembers a SIGTERM (pre-emption notice) so the loop can checkpoint and stop."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the next step, then stopping.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _make_train_step(task, tx, schedule):
  """The update for one global batch: (state, batch) -> (state, metrics)."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      return task.loss(params, state.extras, batch, rng)

    (loss, (metrics, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              extras=extras)
    if hasattr(task, "after_update"):
      new_state = task.after_update(new_state)
    metrics = {"train/loss": loss, "train/learning_rate": schedule(state.step),
               "train/grad_norm": optax.tree.norm(grads), **metrics}
    return new_state, metrics

  return train_step


def create_train_state(config, task, mesh):
  """Returns (state replicated over `mesh`, optax transformation, lr schedule)."""
  params, extras = jax.jit(task.init)(jax.random.PRNGKey(config.seed))
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps,
                                      task.weight_decay_mask(params))

  def init_state(params, extras):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(config.seed + 1), extras=extras)

  state = jax.jit(init_state, out_shardings=sharding_lib.replicated(mesh))(params, extras)
  return state, tx, schedule


def jit_train_step(task, tx, schedule, mesh):
  """The jitted train step: state replicated and donated, batch split along `data`."""
  repl = sharding_lib.replicated(mesh)
  return jax.jit(_make_train_step(task, tx, schedule),
                 in_shardings=(repl, sharding_lib.batch_sharded(mesh)),
                 out_shardings=(repl, repl), donate_argnums=0)


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           save_interval_steps=1))


def _save(mngr, step: int, state: TrainState, train_iter):
  mngr.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)))


def _check_finite(rows: list[tuple[int, dict]], mngr):
  for step, row in rows:
    loss = row["train/loss"]
    if not np.isfinite(loss):
      mngr.wait_until_finished()
      raise FloatingPointError(
          f"train/loss is {loss} at step {step}. Stopped; the last good checkpoint is "
          f"step {mngr.latest_step()} in {mngr.directory}. Lower the learning rate or "
          f"clip gradients (config.optimizer.grad_clip_norm).")


def _write_images(writer, workdir: str, step: int, images: dict[str, np.ndarray]):
  """TensorBoard images, and each [n, h, w, c] uint8 set as one PNG strip in the workdir."""
  writer.write_images(step, images)
  os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
  for name, value in images.items():
    strip = np.concatenate(list(value), axis=1)  # [h, n·w, c]
    path = os.path.join(workdir, "images", f"{name.replace('/', '_')}_{step}.png")
    PIL.Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip).save(path)


def restore_state(workdir: str, step: int | None = None) -> dict:
  """The train state saved in another run's workdir, as a dict of host-local arrays.

  For a later stage that reads an earlier one (a diffusion model its autoencoder, a
  sampler its judge): {"params", "extras", "opt_state", "step", "rng"} of the latest
  (or the given) checkpoint, placed on this process's first device whatever the
  device layout it was saved from.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  mngr = ocp.CheckpointManager(directory)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory}: train that run first (or fix the "
                            f"workdir in the config).")
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          metadata)
  state = checkpointer.restore(path, abstract)
  checkpointer.close()
  mngr.close()
  return state


def _mean_rows(rows: list[tuple[int, dict]]) -> dict[str, float]:
  return {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task,
                       mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Trains `task` as `config` says, in `workdir`; resumes from its last checkpoint.

  Returns the metrics written at the last step (train and eval).
  """
  sharding_lib.check_batch_size(config.global_batch_size, mesh)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # Data: each process reads its own share of every global batch.
  data_sharding = pipeline.Sharding(jax.process_index(), jax.process_count())
  train_iter = iter(task.train_dataset(data_sharding))

  state, tx, schedule = create_train_state(config, task, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Parameters: %d. Devices: %d over %d process(es).", n_params,
               mesh.devices.size, jax.process_count())

  # Resume from the last checkpoint of this workdir, if any.
  mngr = _checkpoint_manager(workdir, config)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  if (latest := mngr.latest_step()) is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      restored = mngr.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(train_iter)))
    except ValueError as e:
      raise ValueError(
          f"The checkpoint at step {latest} in {mngr.directory} does not fit this config's "
          f"model and optimizer (was it written by another experiment?). Use a new "
          f"--workdir, or the config that wrote it.") from e
    state = restored.state
    logging.info("Resumed from step %d in %s", latest, mngr.directory)
    if is_main:
      metrics_lib.truncate_jsonl(jsonl, latest)
  start = int(state.step)

  writer = metrics_lib.create_writer(workdir, is_main)
  train_step = jit_train_step(task, tx, schedule, mesh)
  progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             every_secs=30)

  pending: list[tuple[int, dict]] = []  # (step, device metrics) since the last flush.
  last_log = (start, time.monotonic())
  written: dict[str, float] = {}
  with _SigtermFlag() as sigterm:
    for step in range(start + 1, config.num_train_steps + 1):
      batch = sharding_lib.step_batch(next(train_iter), mesh)
      state, step_metrics = train_step(state, batch)
      pending.append((step, step_metrics))
      progress(step)

      is_last = step == config.num_train_steps
      preempted = sigterm.received or mngr.reached_preemption(step)
      do_log = step % config.log_every_steps == 0 or is_last
      do_eval = step % config.eval_every_steps == 0 or is_last
      do_ckpt = step % config.checkpoint_every_steps == 0 or is_last or preempted
      if not (do_log or do_eval or do_ckpt):
        continue

      # Fetch the metrics of the steps since the last flush; stop on NaN/Inf
      # before anything is saved, so the last checkpoint stays a good one.
      rows = [(s, jax.tree.map(float, jax.device_get(m))) for s, m in pending]
      pending.clear()
      _check_finite(rows, mngr)
      if do_ckpt:
        _save(mngr, step, state, train_iter)
      scalars = {}
      if do_log:
        now = time.monotonic()
        scalars.update(_mean_rows(rows))
        scalars["train/steps_per_sec"] = (step - last_log[0]) / (now - last_log[1])
        last_log = (step, now)
      if do_eval:
        t = time.monotonic()
        results = task.evaluate(state)
        images = {k: v for k, v in results.items() if np.ndim(v) == 4}
        scalars.update({k: v for k, v in results.items() if k not in images})
        if images and is_main:
          _write_images(writer, workdir, step, images)
        scalars["eval/seconds"] = time.monotonic() - t
        last_log = (last_log[0], last_log[1] + scalars["eval/seconds"])
      if do_log or do_eval:
        writer.write_scalars(step, scalars)
        written = scalars
      if preempted and not is_last:
        logging.warning("Pre-empted: checkpoint saved at step %d, stopping.", step)
        break

  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  return written
