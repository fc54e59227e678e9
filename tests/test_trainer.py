"""The generic trainer on a toy task, in-process: NaN stop, device-count invariance."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs
from mmjax.data import pipeline
from mmjax.train import metrics as metrics_lib
from mmjax.train import sharding
from mmjax.train import trainer


class LinearTask:
  """Least squares y = x·w on fixed random data: a task in a dozen lines."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    self.source = pipeline.ArraySource({"x": x, "y": x @ np.arange(1.0, 5.0, dtype=np.float32)})

  def train_dataset(self, data_sharding):
    return pipeline.train_dataset(self.source, global_batch_size=self.config.global_batch_size,
                                  seed=self.config.seed, sharding=data_sharding,
                                  preprocess=lambda b: {"x": b["x"], "y": b["y"]})

  def init(self, rng):
    return {"w": jnp.zeros(4)}, {}

  def weight_decay_mask(self, params):
    return None

  def loss(self, params, extras, batch, rng):
    err = batch["x"] @ params["w"] - batch["y"]
    return jnp.mean(err ** 2), ({}, extras)

  def evaluate(self, state):
    return {"eval/w_error": float(jnp.sum(jnp.abs(state.params["w"] - jnp.arange(1.0, 5.0))))}


def _config(**overrides):
  c = configs.base_config()
  c.task = "linear"
  c.global_batch_size = 16
  c.num_train_steps = 40
  c.log_every_steps = 1
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 5
  c.optimizer.name = "sgd"
  c.optimizer.b1 = 0.0
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = "constant"
  c.update(overrides)
  return c


def test_loss_goes_down_and_eval_runs(tmp_path):
  mesh = sharding.make_mesh()
  final = trainer.train_and_evaluate(_config(), str(tmp_path), LinearTask(_config(), mesh), mesh)
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 41))
  assert rows[-1]["train/loss"] < 0.01 * rows[0]["train/loss"]
  assert final["eval/w_error"] < 0.2  # It starts at |0 - (1, 2, 3, 4)|_1 = 10.


def test_same_losses_on_1_and_4_devices(tmp_path):
  losses = []
  for n in (1, 4):
    mesh = sharding.make_mesh(jax.devices()[:n])
    trainer.train_and_evaluate(_config(), str(tmp_path / str(n)), LinearTask(_config(), mesh), mesh)
    losses.append([r["train/loss"] for r in metrics_lib.read_jsonl(tmp_path / str(n) / "metrics.jsonl")])
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  config = _config(num_train_steps=200)
  config.optimizer.learning_rate = 30.0  # Diverges: |w| grows geometrically, then overflows.
  mesh = sharding.make_mesh()
  with pytest.raises(FloatingPointError, match=r"at step \d+") as e:
    trainer.train_and_evaluate(config, str(tmp_path), LinearTask(config, mesh), mesh)
  bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < bad_step
  assert max(saved) >= bad_step - config.checkpoint_every_steps
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert all(np.isfinite(r["train/loss"]) for r in rows)


def test_batch_that_does_not_divide_the_devices_fails_before_compiling(tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:8])
  config = _config(global_batch_size=20)
  with pytest.raises(ValueError, match="multiple of 8"):
    trainer.train_and_evaluate(config, str(tmp_path), LinearTask(config, mesh), mesh)


def test_a_checkpoint_from_another_model_gets_a_clear_error(tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  config = _config(num_train_steps=5)
  trainer.train_and_evaluate(config, str(tmp_path), LinearTask(config, mesh), mesh)

  class WiderTask(LinearTask):
    def init(self, rng):
      return {"w": jnp.zeros(4), "extra": jnp.zeros(3)}, {}

  config = _config(num_train_steps=10)
  with pytest.raises(ValueError, match="does not fit this config"):
    trainer.train_and_evaluate(config, str(tmp_path), WiderTask(config, mesh), mesh)
