"""The 2-D mesh, sharded state (FSDP), resume on another mesh and gradient accumulation,
on 8 fake CPU devices, in-process, with a tiny MLP task and the CLIP task's loss."""
import functools
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import launch_helpers as lh
from mmjax import configs
from mmjax.data import sources
from mmjax import parallel
from mmjax.tasks import base
from mmjax.tasks import clip as clip_task
from mmjax.train import trainer


class MlpTask(base.Task):
  """Regression with a 2-layer MLP: a per-example loss, parameters worth sharding."""

  def setup(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype(np.float32)
    self.train_source = sources.ArraySource({"x": x, "y": np.sin(x @ rng.normal(size=16))
                                              .astype(np.float32)})

  def train_preprocess(self, batch):
    return {"x": batch["x"], "y": batch["y"]}

  def init(self, rng):
    k1, k2 = jax.random.split(rng)
    return {"w1": jax.random.normal(k1, (16, 64)) / 4, "b1": jnp.zeros(64),
            "w2": jax.random.normal(k2, (64, 24)) / 8, "w3": jnp.ones((24,)) / 24,
            "odd": jnp.ones((7, 9))}, {}

  def loss(self, params, extras, batch, rng):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    pred = jnp.tanh(h @ params["w2"]) @ params["w3"] + jnp.sum(params["odd"]) * 1e-3
    err = (pred - batch["y"]) ** 2
    return jnp.mean(err), ({"train/max_err": jnp.max(err)}, extras)


def _config(**overrides):
  c = configs.base_config()
  c.task = "mlp"
  c.global_batch_size = 32
  c.num_train_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 5
  c.fsdp_min_size = 256  # w1 [16, 64] and w2 [64, 24] split; b1, w3, odd replicated.
  configs.set_optimizer(c, "adamw", weight_decay=0.01, schedule="constant")
  c.update(overrides)
  return c


def _losses(rows):
  return np.array([[r["train/loss"], r["train/max_err"], r["train/grad_norm"]] for r in rows])


def test_mesh_shapes_and_clear_errors():
  assert parallel.mesh_shape({"data": -1, "fsdp": 4}, 8) == (2, 4)
  assert parallel.mesh_shape(None, 8) == (8, 1)
  assert parallel.mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4)
  with pytest.raises(ValueError, match="unknown axes.*'tensor'"):
    parallel.mesh_shape({"tensor": 2}, 8)
  with pytest.raises(ValueError, match="covers 6 devices, but the job has 8"):
    parallel.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="3 does not divide the 8 devices"):
    parallel.mesh_shape({"fsdp": 3}, 8)
  mesh = parallel.make_mesh(jax.devices()[:8], {"fsdp": 4})
  with pytest.raises(ValueError, match=r"grad_accum_steps.*multiple of 32"):
    parallel.check_batch_size(48, mesh, accum_steps=4)


def test_the_fsdp_rule():
  assert parallel.param_spec((16, 64), 8, 256) == P(None, "fsdp")  # Largest divisible axis.
  assert parallel.param_spec((64, 24), 8, 256) == P("fsdp")
  assert parallel.param_spec((7, 9), 8, 1) == P()  # No axis divisible.
  assert parallel.param_spec((64,), 8, 256) == P()  # Small.
  assert parallel.param_spec((16, 64), 1, 1) == P()  # fsdp=1: data parallel.


@functools.cache
def _one_device_losses():
  """The default config's run on one device: the same for every mesh compared with it."""
  with tempfile.TemporaryDirectory() as workdir:
    lh.train(MlpTask, _config(), workdir, 1)
    return _losses(lh.metrics(workdir))


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 4}])
def test_any_mesh_gives_the_losses_of_one_device(tmp_path, mesh_shape):
  one = _one_device_losses()
  lh.train(MlpTask, _config(mesh=mesh_shape), tmp_path, 8, mesh_shape)
  many = _losses(lh.metrics(tmp_path))
  np.testing.assert_allclose(many, one, rtol=2e-5, atol=1e-7)


def test_fsdp_8_holds_an_eighth_of_the_big_leaves_per_device():
  config = _config(mesh={"fsdp": 8})
  mesh = parallel.make_mesh(jax.devices()[:8], config.mesh)
  task = MlpTask(config, mesh)
  task.setup()
  state, _ = trainer.create_train_state(config, task, mesh)
  leaves = jax.tree.leaves((state.params, state.opt_state))
  big = [x for x in leaves if x.size >= config.fsdp_min_size]
  small = [x for x in leaves if x.size < config.fsdp_min_size]
  assert len(big) == 6  # w1, w2 and their two Adam moments.
  for device in mesh.devices.flat:
    held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)
    assert held == sum(x.nbytes for x in big) // 8 + sum(x.nbytes for x in small)


def test_resume_on_another_mesh_continues_as_the_first_mesh_would(tmp_path):
  lh.train(MlpTask, _config(mesh={"fsdp": 8}), tmp_path / "a", 8, {"fsdp": 8})
  first = lh.metrics(tmp_path / "a")
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")  # Resume from step 3 ...
  lh.train(MlpTask, _config(mesh={"data": 4}), tmp_path / "b", 4, {"data": 4})  # ... on 4.
  resumed = lh.metrics(tmp_path / "b")
  assert [r["step"] for r in resumed] == list(range(1, 7))
  np.testing.assert_allclose(_losses(resumed), _losses(first), rtol=2e-5, atol=1e-7)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
  lh.train(MlpTask, _config(), tmp_path / "1", 4)
  lh.train(MlpTask, _config(grad_accum_steps=4), tmp_path / "4", 4)
  full, accum = _losses(lh.metrics(tmp_path / "1")), _losses(lh.metrics(tmp_path / "4"))
  # The max error is a max over each micro-batch, averaged: not the full batch's.
  np.testing.assert_allclose(accum[:, [0, 2]], full[:, [0, 2]], rtol=2e-5, atol=1e-7)


def _clip_config(loss):
  c = configs.clip_fields(_config(task="clip", loss=loss))
  c.model = dict(image_variant="mu/7", image_dims=(32, 1, 64, 2), text_width=32, text_depth=1, text_heads=2,
                 text_mlp_dim=64, max_text_len=12, embed_dim=16)
  c.optimizer.name, c.optimizer.b1 = "sgd", 0.0  # Updates proportional to the gradients.
  return c


@pytest.mark.slow  # Two CLIP train steps in one program on 4 devices.
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_contrastive_accumulation_keeps_the_global_batch_as_negatives(loss):
  """GradCache: grad_accum_steps=4 on 4 devices gives the loss and gradients of one pass."""
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(32, 28, 28, 1)).astype(np.float32),
           "tokens": rng.integers(3, 200, (32, 12)).astype(np.int32),
           "label": rng.integers(0, 10, 32).astype(np.int32)}
  steps, state = [], None
  mesh = parallel.make_mesh(jax.devices()[:4])
  for k in (1, 4):
    config = _clip_config(loss)
    config.grad_accum_steps = k
    task = clip_task.ClipTask(config, mesh)
    task.model_image_shape = (28, 28, 1)  # What setup() reads from the dataset.
    if state is None:  # The same initial state for both (not donated: no in-place update).
      state, opt = trainer.create_train_state(config, task, mesh)
    steps.append(trainer._make_train_step(task, opt, k, parallel.batch_sharded(mesh)))
  # Both steps from the same state, in one program (one compilation).
  (p1, m1), (p4, m4) = jax.device_get(jax.jit(
      lambda state, batch: [(s[0].params, s[1]) for s in (f(state, batch) for f in steps)])(
          state, batch))
  for k in ("train/loss", "train/grad_norm", "train/contrastive_accuracy"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)
