"""The one generic trainer: data-parallel training, evaluation, checkpoints, metrics.

What differs between experiments lives in a *task* (`mmjax/tasks/base.py` lists every
member the trainer uses) and in *evaluators* (`mmjax/evals`, declared in
`config.evals`). Evaluators return scalars and images, uint8 arrays [n, height,
width, channels]: images go to TensorBoard and to `<workdir>/images/<name>_<step>.png`
(n images side by side).

The train step is one `jax.jit` over a mesh of every device of every process:
parameters and optimizer state replicated, the batch split along the `data` axis,
the state donated. Parameters matching `config.frozen` get no gradient, no update and
no optimizer state. The same config gives the same losses on any number of devices.
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
import PIL.Image
from clu import periodic_actions

from mmjax import evals
from mmjax.data import pipeline
from mmjax.train import checkpoints
from mmjax.train import guards
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim
from mmjax.train import sharding as sharding_lib
from mmjax.train import throughput


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


def _make_train_step(task, opt: optim.Optimizer):
  """The update for one global batch: (state, batch) -> (state, metrics)."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      # Frozen leaves are constants here: no backward pass through what only they need.
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                            opt.frozen)
      return task.loss(params, state.extras, batch, rng)

    (loss, (metrics, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = opt.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = task.after_update(state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, extras=extras))
    # 1 if the loss, the gradients and the whole new state are finite: one fused
    # reduction, fetched with the other metrics (no extra host sync per step).
    finite = checkpoints.all_finite((loss, grads, new_state.params, new_state.opt_state,
                                     new_state.extras))
    metrics = {"train/loss": loss, "train/learning_rate": opt.schedule(state.step),
               "train/grad_norm": optax.tree.norm(grads),
               "train/finite": finite.astype(jnp.float32), **metrics}
    return new_state, metrics

  return train_step


def create_train_state(config, task, mesh) -> tuple[TrainState, optim.Optimizer]:
  """Returns (state replicated over `mesh`, the optimizer). `task.setup()` must have run."""
  params, extras = jax.jit(task.init)(jax.random.PRNGKey(config.seed))
  frozen = optim.frozen_mask(params, config.get("frozen", ()))
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps,
                                      task.weight_decay_mask, frozen)

  def init_state(params, extras):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(config.seed + 1), extras=extras)

  state = jax.jit(init_state, out_shardings=sharding_lib.replicated(mesh))(params, extras)
  return state, optim.Optimizer(tx, schedule, frozen)


def jit_train_step(task, opt: optim.Optimizer, mesh):
  """The jitted train step: state replicated and donated, batch split along `data`."""
  repl = sharding_lib.replicated(mesh)
  return jax.jit(_make_train_step(task, opt),
                 in_shardings=(repl, sharding_lib.batch_sharded(mesh)),
                 out_shardings=(repl, repl), donate_argnums=0)


def _check_finite(rows: list[tuple[int, dict]], mngr, max_loss: float | None):
  """Raises FloatingPointError at the first step whose state is not finite, or whose
  loss is above `max_loss`. Pops "train/finite" from the rows."""
  for step, row in rows:
    finite = row.pop("train/finite")
    loss, grad_norm = row["train/loss"], row["train/grad_norm"]
    if finite and (max_loss is None or loss <= max_loss):
      continue
    what = (f"the loss ({loss:.4g}) is above config.max_loss={max_loss}" if finite else
            f"the loss, gradients or new parameters are NaN/Inf (loss {loss:.4g}, "
            f"gradient norm {grad_norm:.4g})")
    mngr.wait_until_finished()
    last = mngr.latest_step()
    saved = (f"the last checkpoint, step {last} in {mngr.directory}, is finite" if last
             is not None else "no checkpoint was saved")
    raise FloatingPointError(
        f"Stopped at step {step}: {what}; {saved}. Lower the learning rate or clip "
        f"gradients (config.optimizer.grad_clip_norm).")


def _write_images(writer, workdir: str, step: int, images: dict[str, np.ndarray]):
  """TensorBoard images, and each [n, h, w, c] uint8 set as one PNG strip in the workdir."""
  writer.write_images(step, images)
  os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
  for name, value in images.items():
    strip = np.concatenate(list(value), axis=1)  # [h, n·w, c]
    path = os.path.join(workdir, "images", f"{name.replace('/', '_')}_{step}.png")
    PIL.Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip).save(path)


def _evaluate(scheduled: list[evals.Scheduled], state: TrainState, writer, workdir: str,
              step: int) -> dict[str, float]:
  """Runs the given evaluators; writes their images; returns their scalars."""
  scalars, images = {}, {}
  t = time.monotonic()
  for s in scheduled:
    for k, v in s.evaluator.run(state.params, state.extras).items():
      (images if np.ndim(v) == 4 else scalars)[k] = v
  if images and jax.process_index() == 0:
    _write_images(writer, workdir, step, images)
  scalars["eval/seconds"] = time.monotonic() - t
  return scalars


def _mean_rows(rows: list[tuple[int, dict]]) -> dict[str, float]:
  return {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task,
                       mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Trains `task` as `config` says, in `workdir`; resumes from its last checkpoint.

  Before anything is compiled: the config is validated (`guards.validate`), the
  workdir locked (`checkpoints.WorkdirLock`), and a restart's config compared with the
  first run's (`guards.check_restart`). Returns the metrics written at the last step
  (train and eval). Raises FloatingPointError at the first non-finite step (or loss
  above `config.max_loss`); every checkpoint saved before it is finite.
  """
  sharding_lib.check_batch_size(config.global_batch_size, mesh)
  guards.validate(config)
  with checkpoints.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, task, mesh)


def _train_and_evaluate(config, workdir, task, mesh) -> dict[str, float]:
  is_main = jax.process_index() == 0
  mngr = checkpoints.manager(workdir, config.keep_checkpoints)
  guards.check_restart(config, workdir, mngr.latest_step(), write=is_main)
  task.setup()
  evaluators = evals.build(config, task)

  # Data: each process reads its own share of every global batch.
  data_sharding = pipeline.Sharding(jax.process_index(), jax.process_count())
  train_iter = iter(task.train_dataset(data_sharding))

  state, opt = create_train_state(config, task, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_frozen = sum(x.size for x, f in zip(jax.tree.leaves(state.params),
                                        jax.tree.leaves(opt.frozen)) if f)
  logging.info("Parameters: %d (%d frozen). Devices: %d over %d process(es).", n_params,
               n_frozen, mesh.devices.size, jax.process_count())

  # Resume from the last good checkpoint of this workdir, if any; metrics and
  # TensorBoard keep only the steps up to it (none when starting from scratch).
  state, latest = checkpoints.restore_latest(mngr, state, train_iter)
  if latest is not None:
    logging.info("Resumed from step %d in %s", latest, mngr.directory)
  if is_main:
    metrics_lib.truncate(workdir, latest or 0)
  start = int(state.step)

  writer = metrics_lib.create_writer(workdir, is_main)
  train_step = jit_train_step(task, opt, mesh)
  flops_per_step, peak = 0.0, throughput.peak_tflops(config)
  profile = throughput.ProfileWindow(config.get("profile_steps"), workdir)
  progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             every_secs=30)

  pending: list[tuple[int, dict]] = []  # (step, device metrics) since the last flush.
  last_log = (start, time.monotonic())
  written: dict[str, float] = {}
  with _SigtermFlag() as sigterm:
    for step in range(start + 1, config.num_train_steps + 1):
      batch = sharding_lib.step_batch(next(train_iter), mesh)
      if step == start + 1:  # Compiled once, here, so that its FLOPs can be counted.
        train_step = train_step.lower(state, batch).compile()
        flops_per_step = throughput.step_flops(train_step)
      profile.before_step(step)
      state, step_metrics = train_step(state, batch)
      profile.after_step(step, state)
      pending.append((step, step_metrics))
      progress(step)

      is_last = step == config.num_train_steps
      preempted = sigterm.received or mngr.reached_preemption(step)
      do_log = step % config.log_every_steps == 0 or is_last
      due = [s for s in evaluators if s.due(step, is_last)]
      do_ckpt = step % config.checkpoint_every_steps == 0 or is_last or preempted
      if not (do_log or due or do_ckpt):
        continue

      # Fetch the metrics of every step since the last flush; stop on NaN/Inf
      # before anything is saved, so every checkpoint is finite.
      rows = [(s, jax.tree.map(float, jax.device_get(m))) for s, m in pending]
      pending.clear()
      _check_finite(rows, mngr, config.get("max_loss"))
      scalars = {}
      if do_log:
        now = time.monotonic()
        scalars.update(_mean_rows(rows))
        scalars["train/steps_per_sec"] = (step - last_log[0]) / (now - last_log[1])
        scalars.update(throughput.rates(scalars["train/steps_per_sec"],
                                        config.global_batch_size, flops_per_step, peak))
        last_log = (step, now)
      if due:
        scalars.update(_evaluate(due, state, writer, workdir, step))
        last_log = (last_log[0], last_log[1] + scalars["eval/seconds"])
      if do_log or due:
        writer.write_scalars(step, scalars)
        written = scalars
      # Metrics first: a kill between the two leaves rows after the last checkpoint,
      # which the restart drops; never a checkpoint with a step's row missing.
      if do_ckpt:
        checkpoints.save(mngr, step, state, train_iter)
      if preempted and not is_last:
        logging.warning("Pre-empted: checkpoint saved at step %d, stopping.", step)
        break

  profile.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  return written


def evaluate_only(config: ml_collections.ConfigDict, workdir: str, task,
                  mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Runs every evaluator of `config.evals` on the latest checkpoint of `workdir`.

  Trains nothing. Metrics and images are written as a training run writes them, into
  `<workdir>/eval_only/` (metrics.jsonl, TensorBoard events, images/), at the
  checkpoint's step. A workdir without a checkpoint is an error, except with
  `config.init_from` (pretrained weights): then the parameters are `task.init`'s,
  i.e. the loaded ones, evaluated as step 0. Returns the metrics.
  """
  task.setup()
  evaluators = evals.build(config, task)
  mngr = checkpoints.manager(workdir, config.keep_checkpoints)
  latest = mngr.latest_step()
  if latest is None and not config.get("init_from"):
    raise FileNotFoundError(f"--eval_only: no checkpoint in {mngr.directory}; train first "
                            f"(the same command without --eval_only), or evaluate "
                            f"pretrained weights with --config.init_from=<file>.")
  state, _ = create_train_state(config, task, mesh)
  step = 0
  if latest is not None:
    state, step = checkpoints.restore_latest(mngr, state, move_corrupt=False)
  else:
    logging.info("--eval_only: no checkpoint in %s; evaluating %s.", mngr.directory,
                 config.init_from)
  mngr.close()
  out_dir = os.path.join(workdir, "eval_only")
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
  writer = metrics_lib.create_writer(out_dir, is_main)
  scalars = _evaluate(evaluators, state, writer, out_dir, step)
  writer.write_scalars(step, scalars)
  writer.flush()
  logging.info("Evaluated the checkpoint at step %d of %s.", step, workdir)
  return scalars
