"""The generic trainer on a toy task, in-process: NaN stop, device-count invariance,
frozen parameters, evaluators and their cadence, --eval_only, load_run."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import launch_helpers as lh
from mmjax import configs
from mmjax import evals
from mmjax import parallel
from mmjax import runs
from mmjax import tasks
from mmjax.data import batching
from mmjax.data import sources
from mmjax.tasks import base
from mmjax.train import checkpoints
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim
from mmjax.train import trainer

TARGET = np.arange(1.0, 5.0, dtype=np.float32)


class LinearTask(base.Task):
  """Least squares y = x·w on fixed random data: a task in a dozen lines."""

  def setup(self):
    x = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    self.train_source = sources.ArraySource({"x": x, "y": x @ TARGET})

  def train_preprocess(self, batch):
    return {"x": batch["x"], "y": batch["y"]}

  def init(self, rng):
    return {"w": jnp.zeros(4), "b": jax.random.normal(jax.random.PRNGKey(0), (64, 64))}, {}

  def loss(self, params, extras, batch, rng):
    err = batch["x"] @ params["w"] - batch["y"]
    return jnp.mean(err ** 2) + 1e-3 * jnp.mean(params["b"] ** 2), ({}, extras)


class WError:
  """An evaluator of this test's own: |w - target|_1, and how often it ran."""

  def __init__(self, task, scale: float = 1.0):
    self.scale = scale
    self.calls = 0

  def run(self, params, extras):
    self.calls += 1
    return {"eval/w_error": self.scale * float(jnp.sum(jnp.abs(params["w"] - TARGET)))}


def _config(**overrides):
  c = configs.base_config()
  c.task = "linear"
  configs.set_steps(c, batch=16, steps=40, log_every=1, eval_every=20, checkpoint_every=5)
  configs.set_optimizer(c, "sgd", b1=0.0, learning_rate=0.05, schedule="constant")
  c.evals.w = dict(type="test_trainer:WError")
  c.update(overrides)
  return c


def test_loss_goes_down_and_eval_runs(tmp_path):
  final = lh.train(LinearTask, _config(), tmp_path)
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 41))
  assert rows[-1]["train/loss"] < 0.01 * rows[0]["train/loss"]
  assert final["eval/w_error"] < 0.2  # It starts at |0 - (1, 2, 3, 4)|_1 = 10.


def test_each_evaluator_runs_at_its_own_cadence_and_at_the_end(tmp_path):
  config = _config(num_train_steps=30)
  config.evals.often = dict(type="test_trainer:WError", every_steps=7, scale=2.0)
  lh.train(LinearTask, config, tmp_path)
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  seen = lambda key: [r["step"] for r in rows if key in r]
  assert seen("eval/w_error") == [7, 14, 20, 21, 28, 30]  # Both write eval/w_error...
  by_step = {r["step"]: r for r in rows}
  # ...the scaled one alone at 7, 14, 21, 28; the plain one alone at 20; both at the end
  # (the later in config order wins the shared key).
  assert by_step[7]["eval/w_error"] > 2.0


def test_unknown_evaluator_type_or_field_is_a_clear_error(tmp_path):
  config = _config()
  config.evals.w = dict(type="accuracy")
  with pytest.raises(ValueError, match=r"config.evals.w.type='accuracy'.*'classification'"):
    lh.train(LinearTask, config, tmp_path)
  config.evals.w = dict(type="test_trainer:WError", scael=2.0)
  with pytest.raises(ValueError, match=r"config.evals.w: unknown field\(s\) \['scael'\]"):
    lh.train(LinearTask, config, tmp_path)


def test_eval_only_reproduces_the_last_evaluation(tmp_path):
  final = lh.train(LinearTask, _config(num_train_steps=25), tmp_path)
  mesh = parallel.make_mesh()
  config = _config(num_train_steps=25)
  again = trainer.evaluate_only(config, str(tmp_path), LinearTask(config, mesh), mesh)
  assert again["eval/w_error"] == final["eval/w_error"]
  row = metrics_lib.read_jsonl(tmp_path / "eval_only" / "metrics.jsonl")[-1]
  assert row["step"] == 25 and row["eval/w_error"] == final["eval/w_error"]
  # Training wrote nothing more.
  assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == 25


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_frozen_leaves_are_not_updated_and_have_no_optimizer_state(tmp_path):
  sizes = {}
  for frozen in ((), ("b",)):
    config = _config(num_train_steps=10, frozen=frozen)
    config.optimizer.name = "adam"
    lh.train(LinearTask, config, tmp_path / str(len(frozen)), 1)
    mesh = parallel.make_mesh(jax.devices()[:1])
    task = LinearTask(config, mesh)
    task.setup()
    state, opt = trainer.create_train_state(config, task, mesh)
    mngr = checkpoints.manager(str(tmp_path / str(len(frozen))), 3)
    state = checkpoints.restore(mngr, 10, state)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)  # Not counts.
    initial = task.init(None)[0]["b"]
    if frozen:
      np.testing.assert_array_equal(state.params["b"], initial)  # Bit-identical.
      assert opt.frozen == {"w": False, "b": True}
      assert moments == 2 * 4  # Adam's mu and nu for w only.
    else:
      assert not np.array_equal(state.params["b"], initial)
      assert moments == 2 * (4 + 64 * 64)
    assert np.abs(state.params["w"]).sum() > 0
    sizes[frozen] = _dir_bytes(tmp_path / str(len(frozen)) / "checkpoints" / "10")
  # The two Adam moments of 4,096 float32 weights: 32 KiB (less compression).
  assert sizes[()] - sizes[("b",)] > 20_000, sizes


def test_a_frozen_pattern_that_matches_nothing_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"config.frozen pattern 'vision/\.\*' matches no "
                                       r"parameter.*top level: \['b', 'w'\]"):
    lh.train(LinearTask, _config(frozen=("vision/.*",)), tmp_path)


def test_same_losses_on_1_and_4_devices(tmp_path):
  losses = []
  for n in (1, 4):
    lh.train(LinearTask, _config(), tmp_path / str(n), n)
    losses.append([r["train/loss"] for r in metrics_lib.read_jsonl(tmp_path / str(n) / "metrics.jsonl")])
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  config = _config(num_train_steps=200)
  config.optimizer.learning_rate = 30.0  # Diverges: |w| grows geometrically, then overflows.
  with pytest.raises(FloatingPointError, match=r"at step \d+") as e:
    lh.train(LinearTask, config, tmp_path)
  bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < bad_step
  assert max(saved) >= bad_step - config.checkpoint_every_steps
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert all(np.isfinite(r["train/loss"]) for r in rows)


class BadGradientTask(LinearTask):
  """LinearTask whose loss is finite but whose gradient for "w" is `self.bad` everywhere."""
  bad = float("nan")

  def loss(self, params, extras, batch, rng):
    @jax.custom_vjp
    def zero(w):
      return jnp.zeros((), w.dtype)

    zero.defvjp(lambda w: (zero(w), w), lambda w, g: (jnp.full_like(w, self.bad),))
    loss, aux = super().loss(params, extras, batch, rng)
    return loss + zero(params["w"]), aux


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name,flatten", [("adam", False), ("adamw", True), ("sgd", False),
                                          ("sgd", True)])
def test_a_bad_gradient_with_a_finite_loss_stops_the_run(tmp_path, bad, name, flatten):
  # The step checks the new state, not the gradients: a bad gradient must reach it,
  # whatever the optimizer, from the first step (learning rate 0 in the warm-up).
  config = _config(num_train_steps=4)
  config.optimizer.update(name=name, flatten=flatten, warmup_steps=2, grad_clip_norm=1.0)
  task_cls = type("Bad", (BadGradientTask,), {"bad": bad})
  with pytest.raises(FloatingPointError, match="at step 1"):
    lh.train(task_cls, config, tmp_path, 1)


def test_batch_that_does_not_divide_the_devices_fails_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="multiple of 8"):
    lh.train(LinearTask, _config(global_batch_size=20), tmp_path, 8)


def test_a_checkpoint_from_another_model_gets_a_clear_error(tmp_path):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path, 1)

  class WiderTask(LinearTask):
    def init(self, rng):
      params, extras = super().init(rng)
      return {**params, "extra": jnp.zeros(3)}, extras

  with pytest.raises(ValueError, match="does not fit this config"):
    lh.train(WiderTask, _config(num_train_steps=10, allow_schedule_change=True), tmp_path, 1)


def test_load_run_reads_another_runs_parameters_and_checks_its_task(tmp_path):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path, 1)
  run = runs.load_run(str(tmp_path), task="linear")
  assert run.step == 5 and run.config["task"] == "linear"
  assert run.params["w"].shape == (4,) and run.extras == {}
  assert run.field("optimizer.name") == "sgd"
  with pytest.raises(ValueError, match=r"config.json has no field 'model.text_width': it was "
                                       r"written by an older mmjax"):
    run.field("model.text_width")
  with pytest.raises(ValueError, match=r"config.clip_workdir=.* is a 'linear' run; a 'clip' "):
    runs.load_run(str(tmp_path), task="clip", field="clip_workdir")
  with pytest.raises(FileNotFoundError, match=r"config.clip_workdir='.*nowhere' holds no run"):
    runs.load_run(str(tmp_path / "nowhere"), task="clip", field="clip_workdir")


def test_unknown_task_lists_every_task():
  config = _config(task="clasify")
  with pytest.raises(ValueError) as e:
    tasks.get_task(config, None)
  for name in tasks.TASKS:
    assert repr(name) in str(e.value)
  assert len(tasks.TASKS) == 7


def test_log_rows_carry_throughput_and_mfu_and_a_profile_window(tmp_path):
  config = _config(num_train_steps=8, log_every_steps=4, peak_tflops_per_device=1.0,
                   profile_steps=(3, 2))
  lh.train(LinearTask, config, tmp_path, 1)
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  last = rows[-1]
  assert last["train/examples_per_sec"] == pytest.approx(16 * last["train/steps_per_sec"])
  # FLOPs per step from XLA's cost analysis; MFU against the configured peak (1 TFLOP/s).
  assert last["train/tflops_per_device"] > 0
  assert last["train/mfu"] == pytest.approx(last["train/tflops_per_device"] / 1.0)
  traces = [f for _, _, fs in os.walk(tmp_path / "profile") for f in fs]
  assert any(f.endswith(".xplane.pb") for f in traces), traces


def test_the_initialisation_compiles_unoptimised_on_a_cpu_with_the_same_values():
  config = _config()
  mesh = parallel.make_mesh(jax.devices()[:2])
  assert trainer.run_once_options(mesh) == {"xla_backend_optimization_level": 0}
  task = LinearTask(config, mesh)
  task.setup()
  state, _ = trainer.create_train_state(config, task, mesh)
  optimised = jax.jit(task.init)(jax.random.PRNGKey(config.seed))[0]
  for name in ("w", "b"):  # "b": jax.random.normal, erf_inv's polynomial; last bits only.
    np.testing.assert_allclose(state.params[name], optimised[name], rtol=1e-6, atol=1e-7)
  assert not np.array_equal(state.params["b"], np.zeros((64, 64)))


def test_the_step_flops_are_per_device():
  from mmjax.train import throughput
  flops = []
  for n in (1, 4):
    config = _config()
    mesh = parallel.make_mesh(jax.devices()[:n])
    task = LinearTask(config, mesh)
    task.setup()
    state, opt = trainer.create_train_state(config, task, mesh)
    batch = next(iter(task.train_dataset(batching.Sharding())))
    compiled = trainer.jit_train_step(task, opt, mesh).lower(state, batch).compile()
    flops.append(throughput.step_flops(compiled))
  # The batch-proportional work splits over 4 devices; the update of the replicated
  # parameters does not, so each device does more than a quarter of one device's FLOPs.
  assert flops[0] / 4 < flops[1] < flops[0]


def test_the_gradient_norm_is_the_same_with_the_flat_update():
  grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(4), "c": jnp.full((5,), -2.0)}
  frozen = {"a": False, "b": True, "c": False}  # A frozen leaf's gradient is zero.
  tree = optim.grad_norm(grads, optim.Optimizer(None, None, frozen, flat=False))
  flat_opt = optim.Optimizer(None, None, frozen, flat=True)
  flat = jax.jit(lambda g: optim.grad_norm(g, flat_opt))(grads)
  np.testing.assert_allclose(flat, tree, rtol=1e-6)
  np.testing.assert_allclose(tree, np.sqrt(55.0 + 20.0), rtol=1e-6)


def test_learning_rate_schedules_warm_up_then_decay_or_hold():
  c = configs.base_config().optimizer
  c.learning_rate, c.warmup_steps, c.end_factor = 0.1, 10, 0.0
  for name, expected in (("cosine", [0.0, 0.05, 0.1, 0.05, 0.0]),
                         ("constant", [0.0, 0.05, 0.1, 0.1, 0.1])):
    c.schedule = name
    schedule = optim.make_schedule(c, 110)
    got = [float(schedule(step)) for step in (0, 5, 10, 60, 110)]  # Eager, as on the host.
    np.testing.assert_allclose(got, expected, atol=1e-7)
    jitted = jax.jit(schedule)
    np.testing.assert_allclose([float(jitted(jnp.int32(s))) for s in (0, 5, 10, 60, 110)],
                               expected, atol=1e-7)
  c.schedule = "linear"
  with pytest.raises(ValueError, match="'cosine' or 'constant'"):
    optim.make_schedule(c, 110)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_a_flat_optimizer_makes_the_same_updates(name):
  """config.optimizer.flatten: clipping and moments over one vector; weight decay by its
  mask and frozen leaves as without it, the parameters equal after a few steps."""
  c = configs.base_config().optimizer
  c.update(name=name, learning_rate=0.05, warmup_steps=2, weight_decay=0.1, grad_clip_norm=0.5)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            "frozen": jnp.ones((2,), jnp.float32)}
  frozen = {"w": False, "b": False, "frozen": True}
  decay = lambda p: {"w": True, "b": False, "frozen": False}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(4)]

  def run(flatten):
    c.flatten = flatten
    tx, _ = optim.make_optimizer(c, 10, decay, frozen)
    p, state = params, tx.init(params)
    for g in grads:
      updates, state = jax.jit(tx.update)(g, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  (flat, flat_state), (tree, _) = run(True), run(False)
  for k in params:
    np.testing.assert_allclose(flat[k], tree[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert not np.allclose(flat["w"], params["w"]) and np.all(flat["frozen"] == 1.0)
  moments = [x for x in jax.tree.leaves(flat_state) if x.ndim == 1 and x.size == 16]
  assert moments, "the trained parameters' moments are one 16-element vector"


def _flat_config(**overrides):
  c = _config(**overrides)
  c.optimizer.flatten = True
  return c


class WideTask(LinearTask):
  """LinearTask with another shape of "b": another model."""

  def init(self, rng):
    return {"w": jnp.zeros(4), "b": jnp.zeros((8, 8))}, {}


def test_eval_only_refuses_a_checkpoint_of_another_optimizer_layout_or_model(tmp_path):
  """A run written without config.optimizer.flatten does not evaluate with it on: the
  error says what to set, as it does for another model."""
  lh.train(LinearTask, _config(num_train_steps=10), tmp_path / "tree")
  mesh = parallel.make_mesh()
  other = _flat_config(num_train_steps=10)  # The config check names the field first.
  with pytest.raises(ValueError, match=r"--eval_only: .*optimizer.flatten: False -> True"):
    trainer.evaluate_only(other, str(tmp_path / "tree"), LinearTask(other, mesh), mesh)
  other = _config(num_train_steps=10)
  with pytest.raises(ValueError, match=r"does not fit this config's model and optimizer "
                                       r"\(was it written by another experiment, or with "
                                       r"another config.optimizer.flatten\?\)"):
    trainer.evaluate_only(other, str(tmp_path / "tree"), WideTask(other, mesh), mesh)
