"""Fusion blocks: additive embeddings, [CLS] image [SEP] text, perceiver resampler, ImageBERT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import models
from mmjax import nn as mnn
from mmjax.data import tokenizer
from mmjax.nn import fusion
from mmjax.nn import transformer


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_additive_fusion_sums_and_checks_shapes():
  tok, pos, seg = _normal(0, (2, 5, 8)), _normal(1, (1, 5, 8)), _normal(2, (2, 5, 8))
  np.testing.assert_allclose(fusion.additive_fusion(tok, pos, seg), tok + pos + seg)
  np.testing.assert_allclose(fusion.additive_fusion(tok, pos), tok + pos)
  with pytest.raises(ValueError, match="len, width"):
    fusion.additive_fusion(tok, pos[:, :4])


def test_concat_image_text_layout_segments_and_validity():
  b, n_img, n_txt, w = 2, 3, 4, 8
  cls, sep = jnp.full((w,), 7.0), jnp.full((w,), 9.0)
  image, text = _normal(0, (b, n_img, w)), _normal(1, (b, n_txt, w))
  image_valid = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  text_valid = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  x, seg, valid = fusion.concat_image_text(cls, image, image_valid, sep, text, text_valid)
  assert x.shape == (b, 2 + n_img + n_txt, w)
  np.testing.assert_array_equal(x[:, 0], jnp.broadcast_to(cls, (b, w)))
  np.testing.assert_array_equal(x[:, 1:4], image)
  np.testing.assert_array_equal(x[:, 4], jnp.broadcast_to(sep, (b, w)))
  np.testing.assert_array_equal(x[:, 5:], text)
  np.testing.assert_array_equal(seg[0], [0, 0, 0, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(valid, [[1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1, 1, 1, 1]])
  assert fusion.key_padding_mask(valid).shape == (b, 1, 1, 9)
  with pytest.raises(ValueError, match="share batch and width"):
    fusion.concat_image_text(cls, image, image_valid, sep, text[..., :4], text_valid)


def test_single_stream_padding_changes_nothing_in_the_valid_outputs():
  """Whatever sits at a padded position (image or text) the other positions' outputs stay."""
  b, n_img, n_txt, w = 2, 4, 5, 16
  image_valid = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  text_valid = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  embed = fusion.SingleStreamEmbedding(max_len=2 + n_img + n_txt)
  encoder = transformer.Encoder(depth=2, num_heads=2, mlp_dim=32)

  def run(params, image, text):
    x, valid = embed.apply(params["embed"], image, image_valid, text, text_valid)
    return encoder.apply(params["encoder"], x, fusion.key_padding_mask(valid)), valid

  image, text = _normal(0, (b, n_img, w)), _normal(1, (b, n_txt, w))
  # Other values at every padded position, image and text.
  image2 = jnp.where(image_valid[..., None], image, 100.0 * _normal(4, image.shape))
  text2 = jnp.where(text_valid[..., None], text, -50.0 * _normal(5, text.shape))

  @jax.jit  # Initialisation and both runs: one compilation, not op by op.
  def init_and_run(image, text, image2, text2):
    params = {"embed": embed.init(jax.random.PRNGKey(2), image, image_valid, text, text_valid)}
    x, _ = embed.apply(params["embed"], image, image_valid, text, text_valid)
    params["encoder"] = encoder.init(jax.random.PRNGKey(3), x)
    return run(params, image, text), run(params, image2, text2)[0]

  (out, valid), out2 = init_and_run(image, text, image2, text2)
  keep = np.asarray(valid)
  assert not keep.all()
  np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(out2)[keep], atol=1e-5)
  assert not np.allclose(np.asarray(out)[~keep], np.asarray(out2)[~keep])


def test_additive_embedding_adds_position_and_segment_tables():
  module = fusion.AdditiveEmbedding(max_len=6, num_segments=2)
  x = jnp.zeros((1, 4, 8))
  seg = jnp.array([[0, 0, 1, 1]])
  params = module.init(jax.random.PRNGKey(0), x, seg)["params"]
  out = module.apply({"params": params}, x, seg)
  expect = params["pos_embedding"][:4] + params["segment_embedding"]["embedding"][seg[0]]
  np.testing.assert_allclose(out[0], expect, rtol=1e-6)
  with pytest.raises(ValueError, match="max_len=6"):
    module.apply({"params": params}, jnp.zeros((1, 7, 8)), jnp.zeros((1, 7), int))


def test_perceiver_resampler_pools_to_num_latents_and_ignores_masked_context():
  resampler = mnn.PerceiverResampler(num_latents=3, depth=2, num_heads=2, width=16)
  context = _normal(0, (2, 10, 24))  # Another width than the latents': projected.
  valid = jnp.arange(10)[None, :] < jnp.array([[10], [6]])
  changed = jnp.where(valid[..., None], context, 7.0)

  @jax.jit  # One compilation, not op by op.
  def init_and_apply(context, changed, valid):
    params = resampler.init(jax.random.PRNGKey(1), context, valid)
    return (resampler.apply(params, context, valid), resampler.apply(params, changed, valid),
            resampler.apply(params, context[:, :4]))

  out, out_changed, out_short = init_and_apply(context, changed, valid)
  assert out.shape == (2, 3, 16)
  np.testing.assert_allclose(out_changed, out, atol=1e-5)
  # Any number of context tokens gives the same number of latents.
  assert out_short.shape == (2, 3, 16)


def test_modality_projection_maps_to_the_lm_width():
  proj = mnn.ModalityProjection(out_width=48)
  x = _normal(0, (2, 3, 16))
  params = proj.init(jax.random.PRNGKey(0), x)
  assert proj.apply(params, x).shape == (2, 3, 48)


def test_imagebert_heads_shapes_and_text_padding():
  model = models.ImageBERT(patch=7, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=2 + 16 + 14)
  images = _normal(0, (2, 28, 28, 1))
  tokens = jnp.asarray(tokenizer.ByteTokenizer(10).encode(["a one", "a seven, a"]))
  image_valid = jnp.ones((2, 16), bool).at[:, 5].set(False)
  patch = images.at[:, 7:14, 7:14].set(50.0)  # Patch 5 of the 4x4 grid of 7x7 patches.

  @jax.jit  # Initialisation and the five passes: one compilation, not op by op.
  def init_and_apply(images, tokens, image_valid, patch):
    params = model.init(jax.random.PRNGKey(1), images, tokens)
    return (model.apply(params, images, tokens),
            model.apply(params, images, jnp.pad(tokens, ((0, 0), (0, 4)))),
            model.apply(params, images, tokens, image_valid),
            model.apply(params, patch, tokens, image_valid),
            model.apply(params, patch, tokens))

  out, longer, base, moved, unmasked = init_and_apply(images, tokens, image_valid, patch)
  assert out["itm_logit"].shape == (2,)
  assert out["mlm_logits"].shape == (2, 10, tokenizer.VOCAB_SIZE + 1)
  # More PAD columns change nothing at the real tokens.
  np.testing.assert_allclose(longer["itm_logit"], out["itm_logit"], atol=1e-5)
  np.testing.assert_allclose(longer["mlm_logits"][:, :10], out["mlm_logits"], atol=1e-4)
  # A masked image patch: its pixels do not matter.
  np.testing.assert_allclose(moved["itm_logit"], base["itm_logit"], atol=1e-5)
  np.testing.assert_allclose(moved["mlm_logits"], base["mlm_logits"], atol=1e-4)
  assert not np.allclose(unmasked["itm_logit"], out["itm_logit"])
