"""FLIP's patch dropout in the ViT (`patch_dropout`): the share kept, the class token,
evaluation untouched, and a CLIP step with it exact under gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs
from mmjax.data import tokenizer
from mmjax.models import clip as clip_model
from mmjax.models import vit
from mmjax.tasks import clip as clip_task
from mmjax import parallel
from mmjax.train import trainer


def test_drop_patches_keeps_the_class_token_and_the_right_share_per_example():
  b, n, w = 6, 1 + 49, 3
  # Token j of example i holds (i, j, j): which tokens were kept is readable.
  x = jnp.stack([jnp.stack([jnp.full((n,), i), jnp.arange(n), jnp.arange(n)], -1)
                 for i in range(b)]).astype(jnp.float32)
  for rate, keep in ((0.5, 24), (0.75, 12), (0.25, 36), (0.99, 1)):
    out = np.asarray(vit.drop_patches(x, rate, jax.random.PRNGKey(0), keep_first=1))
    assert out.shape == (b, 1 + keep, w)
    assert np.all(out[:, 0, 1] == 0)  # The class token, first.
    for i in range(b):
      assert np.all(out[i, :, 0] == i)  # Each example's own tokens.
      ids = out[i, 1:, 1]
      assert np.all(np.diff(ids) > 0) and ids.min() >= 1  # Distinct patches, in order.
    if keep > 1:  # Examples drop different patches.
      assert len({tuple(out[i, 1:, 1]) for i in range(b)}) > 1


def _vit(rate, pool="tok"):
  return vit.ViT("mu/7", pool=pool, dims=(32, 1, 64, 2), patch_dropout=rate)


def test_evaluation_keeps_every_patch_and_is_deterministic():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), jnp.float32)
  params = _vit(0.0).init(jax.random.PRNGKey(0), images)
  plain = _vit(0.0).apply(params, images)
  model = _vit(0.5)
  for key in (1, 2):  # Whatever rng is given, evaluation keeps every patch.
    out = model.apply(params, images, rngs={"dropout": jax.random.PRNGKey(key)})
    np.testing.assert_array_equal(out, plain)
  trained = [model.apply(params, images, False, rngs={"dropout": jax.random.PRNGKey(k)})
             for k in (1, 1, 2)]
  np.testing.assert_array_equal(trained[0], trained[1])  # Same key, same patches.
  assert not np.allclose(trained[0], trained[2])
  assert not np.allclose(trained[0], plain)


def test_a_rate_outside_0_1_is_a_one_line_error_when_the_model_is_built():
  for rate in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=r"patch_dropout=.* must be in \[0, 1\)"):
      clip_model.CLIP(patch_dropout=rate)


@pytest.mark.slow
def test_clip_with_patch_dropout_scan_remat_bf16_gives_the_same_step_on_1_and_4_devices():
  """Scanned, rematerialised bfloat16 towers with patch dropout, 2 micro-batches
  (GradCache: each re-embedded with its key, so the same patches): the sharded losses
  on 4 devices give the one-device loss and gradient norm."""
  c = configs.clip_fields(configs.base_config())
  c.task, c.loss, c.global_batch_size, c.grad_accum_steps = "clip", "sigmoid", 16, 2
  c.model = dict(image_variant="mu/7", image_dims=(32, 2, 64, 2), text_width=32, text_depth=1,
                 text_heads=2, text_mlp_dim=64, max_text_len=12, embed_dim=16,
                 patch_dropout=0.5)
  c.scan_layers, c.remat, c.dtype = True, "full", "bfloat16"
  c.optimizer.name, c.optimizer.b1 = "sgd", 0.0
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 200, (16, 12)).astype(np.int32)
  tokens[:, -1] = tokenizer.EOS
  batch = {"image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32), "tokens": tokens,
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  metrics = []
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    task = clip_task.ClipTask(c, mesh)
    task.model_image_shape = (28, 28, 1)
    state, opt = trainer.create_train_state(c, task, mesh)
    step = trainer.jit_train_step(task, opt, mesh)
    metrics.append(jax.device_get(step(state, batch)[1]))
  assert np.isfinite(metrics[0]["train/loss"])
  for key in ("train/loss", "train/grad_norm"):
    np.testing.assert_allclose(metrics[1][key], metrics[0][key], rtol=2e-2, err_msg=key)
