"""The one generic trainer: data-parallel training, evaluation, checkpoints, metrics.

What differs between experiments lives in a *task* (`mmjax/tasks/base.py` lists every
member the trainer uses) and in *evaluators* (`mmjax/evals`, declared in
`config.evals`). Evaluators return scalars and images, uint8 arrays [n, height,
width, channels]: images go to TensorBoard and to `<workdir>/images/<name>_<step>.png`
(n images side by side).

The train step is one `jax.jit` over a mesh of every device of every process, axes
`data` x `fsdp` (`config.mesh`): the batch split over both, parameters and optimizer
state split along `fsdp` (`parallel.state_sharding`; replicated with the default
fsdp=1), the state donated. With `config.grad_accum_steps` = k the global batch runs
as k micro-batches and one update (exact for contrastive losses too). Parameters
matching `config.frozen` get no gradient, no update and no optimizer state. The same
config gives the same losses on any number of devices and any mesh, and a checkpoint
restores on another mesh.
"""
import dataclasses
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

from mmjax import evals
from mmjax import parallel
from mmjax.data import batching
from mmjax.train import checkpoints
from mmjax.train import console as console_lib
from mmjax.train import guards
from mmjax.train import memory
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim
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
  """Remembers a SIGTERM (pre-emption notice) so the loop can checkpoint and stop.

  Only once `arm()` is called, after the first step: until then there is nothing to
  save since the restored checkpoint, and SIGTERM keeps its default action (the
  process ends at once, also while a first batch is read or the step compiles).
  """

  def __init__(self):
    self.received = False
    self._armed = False
    self._previous = None

  def __enter__(self):
    return self

  def arm(self):
    if not self._armed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._armed = True

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the next step, then stopping.")
    self.received = True

  def __exit__(self, *exc):
    if self._armed:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def _split(batch, k: int):
  """Leaves [b, ...] -> [k, b/k, ...]. Micro-batch j holds rows j, j+k, j+2k, ...: each
  device's rows divide among the micro-batches, so each stays split over every device."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1),
                      batch)


def _merge(micro):
  """The inverse of `_split`: leaves [k, b/k, ...] -> [b, ...] in the batch's row order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), micro)


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _loss_and_grads(task, opt: optim.Optimizer, state: TrainState, batch, rng, k: int,
                    micro_sharding):
  """(loss, (metrics, extras)), grads of the global batch, in `k` micro-batches.

  k = 1: one pass. A per-example loss (the default): `lax.scan` over the micro-batches,
  gradients and metrics averaged (the mean of equal micro-batch means is the batch
  mean), extras threaded through. A task with `batch_coupled = True` (contrastive: the
  other examples are the negatives) is accumulated exactly, as GradCache does: the
  embeddings of every micro-batch without gradients, the loss and its gradient with
  respect to all of them at once (the negatives are the whole global batch), then
  each micro-batch again with gradients, its embeddings' cotangents pulled back.
  Micro-batch j draws its randomness from fold_in(rng, j) in every pass.
  """
  def freeze(params):  # Frozen leaves are constants: no backward pass through them.
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, opt.frozen)

  def loss_fn(params, extras, batch, rng):
    return task.loss(freeze(params), extras, batch, rng)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    return grad_fn(state.params, state.extras, batch, rng)
  micro = _split(batch, k)
  keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(k))
  constrain = lambda mb: jax.lax.with_sharding_constraint(mb, micro_sharding)

  if not task.batch_coupled:
    def body(carry, inputs):
      grads, extras = carry
      mb, key = inputs
      (loss, (metrics, extras)), g = grad_fn(state.params, extras, constrain(mb), key)
      return (_add(grads, g), extras), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, extras), (loss, metrics) = jax.lax.scan(body, (zeros, state.extras), (micro, keys))
    mean = lambda t: jax.tree.map(lambda x: jnp.mean(x, axis=0), t)
    return (jnp.mean(loss), (mean(metrics), extras)), jax.tree.map(lambda g: g / k, grads)

  def embed(params, mb, key):
    return task.embed_for_loss(freeze(params), state.extras, constrain(mb), key)

  constants = jax.lax.stop_gradient(state.params)
  embeddings = _merge(jax.lax.map(lambda a: embed(constants, *a), (micro, keys)))
  (loss, aux), (grads, cotangents) = jax.value_and_grad(
      lambda p, e: task.loss_from_embeddings(freeze(p), state.extras, e, rng),
      argnums=(0, 1), has_aux=True)(state.params, embeddings)

  def pull_back(grads, inputs):
    mb, key, cotangent = inputs
    _, vjp = jax.vjp(lambda p: embed(p, mb, key), state.params)
    return _add(grads, vjp(cotangent)[0]), None

  grads, _ = jax.lax.scan(pull_back, grads, (micro, keys, _split(cotangents, k)))
  return (loss, aux), grads


def _make_train_step(task, opt: optim.Optimizer, k: int, micro_sharding):
  """The update for one global batch: (state, batch) -> (state, metrics)."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, (metrics, extras)), grads = _loss_and_grads(task, opt, state, batch, rng, k,
                                                       micro_sharding)
    updates, opt_state = opt.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = task.after_update(state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, extras=extras))
    # 1 if the loss and the whole new state are finite (a float32 sum per leaf), fetched
    # with the other metrics (no extra host sync per step). A NaN or infinite gradient
    # of a trained leaf always reaches its new parameters or moments (a frozen leaf's
    # gradient is zero), so the gradients need no check of their own.
    finite = checkpoints.all_finite((loss, new_state.params, new_state.opt_state,
                                     new_state.extras))
    metrics = {"train/loss": loss, "train/learning_rate": opt.schedule(state.step),
               "train/grad_norm": optim.grad_norm(grads, opt),
               "train/finite": finite.astype(jnp.float32), **metrics}
    return new_state, metrics

  return train_step


def create_train_state(config, task, mesh) -> tuple[TrainState, optim.Optimizer]:
  """Returns (state on `mesh`, the optimizer). `task.setup()` must have run.

  The state is created directly in its sharding (`parallel.state_sharding`):
  with `config.mesh.fsdp` > 1 the parameters, optimizer moments and extras of at least
  `config.fsdp_min_size` elements are split along `fsdp`, the rest replicated.
  """
  rng = jax.random.PRNGKey(config.seed)
  # Loaded weights go to the devices as arguments of the jitted initialisation, not as
  # constants compiled into it (a CLIP L/14 file is 1.7 GB).
  loaded = task.pretrained()

  def init_params(rng, loaded):
    return task.init(rng) if loaded is None else loaded

  abstract_params = jax.eval_shape(init_params, rng, loaded)[0]
  frozen = optim.frozen_mask(abstract_params, config.get("frozen", ()),
                             config.get("lora", {}).get("train", ()))
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps,
                                      task.weight_decay_mask, frozen)

  def init_state(rng, loaded):
    params, extras = init_params(rng, loaded)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(config.seed + 1), extras=extras)

  shardings = parallel.state_sharding(jax.eval_shape(init_state, rng, loaded), mesh,
                                          config.get("fsdp_min_size", 2 ** 16))
  if loaded is not None:
    loaded = jax.device_put(loaded, (shardings.params, shardings.extras))
  state = jax.jit(init_state, out_shardings=shardings,
                  compiler_options=run_once_options(mesh))(rng, loaded)
  return state, optim.Optimizer(tx, schedule, frozen,
                                 bool(config.optimizer.get("flatten", False)))


def run_once_options(mesh) -> dict | None:
  """XLA options for a program that runs once (the initialisation): on a CPU, no
  backend (LLVM) optimisation, whose compile time a single run never earns back; the
  U-Net's initialisation compiles in about half the time. Values can differ from an
  optimised compile in the last bit. Other backends: None (their defaults)."""
  if mesh.devices.flat[0].platform != "cpu":
    return None
  return {"xla_backend_optimization_level": 0}


def jit_train_step(task, opt: optim.Optimizer, mesh, state_sharding=None):
  """The jitted train step: the state laid out as `state_sharding` (default:
  replicated; the trainer passes the state's own) and donated, the batch split over
  the mesh, in `task.config.grad_accum_steps` micro-batches (default 1)."""
  repl = parallel.replicated(mesh)
  k = task.config.get("grad_accum_steps") or 1
  step = _make_train_step(task, opt, k, parallel.batch_sharded(mesh))
  state_sharding = repl if state_sharding is None else state_sharding
  return jax.jit(step, in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
                 out_shardings=(state_sharding, repl), donate_argnums=0)


def _check_finite(rows: list[tuple[int, dict]], mngr, max_loss: float | None):
  """Raises FloatingPointError at the first step whose state is not finite, or whose
  loss is above `max_loss`. Pops "train/finite" from the rows."""
  for step, row in rows:
    finite = row.pop("train/finite")
    loss, grad_norm = row["train/loss"], row["train/grad_norm"]
    if finite and (max_loss is None or loss <= max_loss):
      continue
    what = (f"the loss ({loss:.4g}) is above config.max_loss={max_loss}" if finite else
            f"the loss, gradients or new state are NaN/Inf, or so large that their sum "
            f"overflows float32 (loss {loss:.4g}, "
            f"gradient norm {grad_norm:.4g})")
    mngr.wait_until_finished()
    last = mngr.latest_step()
    saved = (f"the last checkpoint, step {last} in {mngr.directory}, is finite" if last
             is not None else "no checkpoint was saved")
    raise FloatingPointError(
        f"Stopped at step {step}: {what}; {saved}. Lower the learning rate or clip "
        f"gradients (config.optimizer.grad_clip_norm), and rerun this --workdir with "
        f"--config.resume_changes=<the fields changed, e.g. optimizer.learning_rate> to "
        f"resume from the last checkpoint.")


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


@dataclasses.dataclass
class _Setup:
  """What training and `evaluate_only` share, made by `_set_up`."""
  mngr: Any  # The workdir's ocp.CheckpointManager.
  evaluators: list[evals.Scheduled]
  train_iter: Any  # The task's training batches (training only; None for evaluation).
  state: TrainState
  opt: optim.Optimizer
  step: int | None  # The restored checkpoint's step; None: nothing restored.


def _check_config(config, workdir: str, mngr, latest: int | None, *, training: bool):
  """`guards.check_restart` against the config saved with the latest checkpoint
  (`checkpoints.saved_config`). Training records the config (process 0); --eval_only
  with a checkpoint refuses the fields that change the experiment and writes nothing."""
  if not training and latest is None:
    return
  saved, where = (None, "") if latest is None else checkpoints.saved_config(mngr, latest)
  guards.check_restart(config, workdir, latest, write=training and jax.process_index() == 0,
                       saved=saved, saved_path=where, evaluating=not training)


def _set_up(config, workdir: str, task, mesh, *, training: bool) -> _Setup:
  """The checkpoint manager, the task set up, its evaluators and the state, restored
  from the workdir's latest good checkpoint if there is one.

  The config is first compared with the one that wrote the latest checkpoint
  (`_check_config`). Training: the batch's host memory is checked
  (`memory.check_batch_memory`) before the data iterator is made and restored with the
  state, and a latest checkpoint that cannot be restored is moved aside. Evaluation: a
  workdir without a checkpoint is an error unless `config.init_from` gives the
  weights, and nothing in the workdir is moved.
  """
  logging.info("Config:\n%s", config)
  mngr = checkpoints.manager(workdir, config.keep_checkpoints)
  latest = mngr.latest_step()
  _check_config(config, workdir, mngr, latest, training=training)
  if not training and latest is None and not config.get("init_from"):
    raise FileNotFoundError(f"--eval_only: no checkpoint in {mngr.directory}; train first "
                            f"(the same command without --eval_only), or evaluate "
                            f"pretrained weights with --config.init_from=<file>.")
  task.setup()
  if training:  # Before any batch is read: a batch that cannot fit is refused.
    memory.check_batch_memory(task, config, jax.process_count())
  evaluators = evals.build(config, task)
  train_iter = None
  if training:  # Each process reads its own share of every global batch.
    train_iter = iter(task.train_dataset(
        batching.Sharding(jax.process_index(), jax.process_count())))

  state, opt = create_train_state(config, task, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_frozen = sum(x.size for x, f in zip(jax.tree.leaves(state.params),
                                        jax.tree.leaves(opt.frozen)) if f)
  logging.info("Parameters: %d (%d frozen). Devices: %d over %d process(es), mesh %s.",
               n_params, n_frozen, mesh.devices.size, jax.process_count(), dict(mesh.shape))
  if training and n_frozen and jax.process_index() == 0:  # Fine-tuning: say how much trains.
    console_lib.info("Training %s of %s parameters (%.2f%%); the rest are frozen",
                     f"{n_params - n_frozen:,}", f"{n_params:,}",
                     100.0 * (n_params - n_frozen) / n_params)
  state, step = checkpoints.restore_latest(mngr, state, train_iter, move_corrupt=training)
  return _Setup(mngr, evaluators, train_iter, state, opt, step)


class _Outputs:
  """What a training run writes at the steps that log, evaluate or checkpoint."""

  def __init__(self, config, workdir: str, mngr, writer, start: int):
    self.config, self.workdir, self.mngr, self.writer = config, workdir, mngr, writer
    self.pending: list[tuple[int, dict]] = []  # (step, device metrics) since the last write.
    self.last_log = (start, time.monotonic())
    self.flops_per_step = 0.0  # Set once the step is compiled.
    self.peak = throughput.peak_tflops(config)
    self.written: dict[str, float] = {}  # The last metrics written.

  def write(self, step: int, state: TrainState, train_iter, due: list[evals.Scheduled], *,
            log: bool, save: bool):
    """Fetches the metrics of every step since the last write and stops on NaN/Inf
    (`_check_finite`) before anything is saved, so every checkpoint is finite; then
    writes the mean train metrics (`log`) and the due evaluators' results, then saves
    a checkpoint (`save`)."""
    rows = [(s, jax.tree.map(float, jax.device_get(m))) for s, m in self.pending]
    self.pending.clear()
    _check_finite(rows, self.mngr, self.config.get("max_loss"))
    scalars = {}
    if log:
      now = time.monotonic()
      scalars.update(_mean_rows(rows))
      scalars["train/steps_per_sec"] = (step - self.last_log[0]) / (now - self.last_log[1])
      scalars.update(throughput.rates(scalars["train/steps_per_sec"],
                                      self.config.global_batch_size, self.flops_per_step,
                                      self.peak))
      self.last_log = (step, now)
    if due:
      scalars.update(_evaluate(due, state, self.writer, self.workdir, step))
      self.last_log = (self.last_log[0], self.last_log[1] + scalars["eval/seconds"])
    if log or due:
      self.writer.write_scalars(step, scalars)
      self.written = scalars
    # Metrics first: a kill between the two leaves rows after the last checkpoint,
    # which the restart drops; never a checkpoint with a step's row missing.
    if save:
      checkpoints.save(self.mngr, step, state, train_iter, self.config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task,
                       mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Trains `task` as `config` says, in `workdir`; resumes from its last checkpoint.

  The run's one preflight, before any data is read or anything compiled: the batch
  size against the mesh (`parallel.check_batch_size`), the config's values
  (`guards.validate`), then the workdir lock (`checkpoints.WorkdirLock`, held until
  the run ends: a second run on the workdir stops here). A restart's config is then
  compared with the first run's (`guards.check_restart`). Returns the metrics written
  at the last step (train and eval). Raises FloatingPointError at the first non-finite
  step (or loss above `config.max_loss`); every checkpoint saved before it is finite.
  """
  parallel.check_batch_size(config.global_batch_size, mesh,
                            accum_steps=config.get("grad_accum_steps") or 1)
  guards.validate(config)
  with checkpoints.WorkdirLock(workdir):
    return _train(config, workdir, task, mesh)


def _train(config, workdir, task, mesh) -> dict[str, float]:
  run = _set_up(config, workdir, task, mesh, training=True)
  mngr, state, train_iter = run.mngr, run.state, run.train_iter
  # Metrics and TensorBoard keep only the steps up to the restored checkpoint (none
  # when starting from scratch).
  if run.step is not None:
    logging.info("Resumed from step %d in %s", run.step, mngr.directory)
  is_main = jax.process_index() == 0
  if is_main:
    metrics_lib.truncate(workdir, run.step or 0)
  start = int(state.step)

  console = _console(config, start, run.step, mngr.directory, is_main)
  writer = metrics_lib.MultiWriter([metrics_lib.create_writer(workdir, is_main), console])
  train_step = jit_train_step(task, run.opt, mesh, jax.tree.map(lambda x: x.sharding, state))
  profile = throughput.ProfileWindow(config.get("profile_steps"), workdir)
  out = _Outputs(config, workdir, mngr, writer, start)
  with _SigtermFlag() as sigterm:
    for step in range(start + 1, config.num_train_steps + 1):
      batch = parallel.step_batch(next(train_iter), mesh)
      if step == start + 1:  # Compiled once, here, so that its FLOPs can be counted.
        train_step = train_step.lower(state, batch).compile()
        out.flops_per_step = throughput.step_flops(train_step)
        if config.get("scan_layers"):
          logging.info("scan_layers: XLA counts a scanned layer once, so train/tflops_per_"
                       "device and train/mfu are lower bounds.")
      profile.before_step(step)
      state, step_metrics = train_step(state, batch)
      sigterm.arm()
      profile.after_step(step, state)
      out.pending.append((step, step_metrics))
      console.advance(step)

      is_last = step == config.num_train_steps
      preempted = sigterm.received or mngr.reached_preemption(step)
      log = step % config.log_every_steps == 0 or is_last
      due = [s for s in run.evaluators if s.due(step, is_last)]
      save = step % config.checkpoint_every_steps == 0 or is_last or preempted
      if log or due or save:
        out.write(step, state, train_iter, due, log=log, save=save)
      if preempted and not is_last:
        logging.warning("Pre-empted: checkpoint saved at step %d, stopping.", step)
        break

  profile.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  console.close()
  return out.written


def _console(config, start: int, restored: int | None, ckpt_dir: str,
             is_main: bool) -> console_lib.Console:
  """The run's console (`mmjax/train/console.py`): says where it starts, then shows a
  line per logged step and, on a terminal, a progress bar."""
  if is_main:
    if restored is not None:
      console_lib.info("Resumed from step %d in %s", restored, ckpt_dir)
    else:
      console_lib.info("Training %d steps (the first one compiles)", config.num_train_steps)
  return console_lib.Console(config.num_train_steps, start, enabled=is_main)


def evaluate_only(config: ml_collections.ConfigDict, workdir: str, task,
                  mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Runs every evaluator of `config.evals` on the latest checkpoint of `workdir`.

  Trains nothing, takes no lock. Metrics and images are written as a training run
  writes them, into `<workdir>/eval_only/` (metrics.jsonl, TensorBoard events,
  images/), at the checkpoint's step, replacing the rows of an earlier evaluation of
  that step. The config is checked against the one that wrote the checkpoint
  (`guards.check_restart`): a field that changes the experiment (task, model, dataset,
  ...) is refused; evaluator fields may differ. A workdir without a checkpoint is an error,
  except with `config.init_from` (pretrained weights): then the parameters are
  `task.pretrained()`'s, with the loaded ones, evaluated as step 0. Returns the metrics.
  """
  parallel.check_batch_size(config.global_batch_size, mesh,
                            accum_steps=config.get("grad_accum_steps") or 1)
  run = _set_up(config, workdir, task, mesh, training=False)
  run.mngr.close()
  if run.step is None:
    logging.info("--eval_only: no checkpoint in %s; evaluating %s.", run.mngr.directory,
                 config.init_from)
  step = run.step or 0
  out_dir = os.path.join(workdir, "eval_only")
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(out_dir, exist_ok=True)
    metrics_lib.drop_step(out_dir, step)  # A repeated evaluation replaces its rows.
  writer = metrics_lib.create_writer(out_dir, is_main)
  scalars = _evaluate(run.evaluators, run.state, writer, out_dir, step)
  writer.write_scalars(step, scalars)
  writer.flush()
  logging.info("Evaluated the checkpoint at step %d of %s.", step, workdir)
  return scalars
