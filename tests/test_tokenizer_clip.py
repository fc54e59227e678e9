"""Byte tokenizer round trip; CLIP model shapes, norms, temperature and weight-decay mask."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import tokenizer
from mmjax.models import clip, vit


def test_tokenizer_round_trip_truncation_and_layout():
  tok = tokenizer.ByteTokenizer(max_len=12)
  ids = tok.encode(["a seven", "héllo", "a very long caption indeed"])
  assert ids.shape == (3, 12) and ids.dtype == np.int32
  assert tok.decode(ids)[:2] == ["a seven", "héllo"]
  assert tok.decode(ids)[2] == "a very lon"  # 12 - BOS - EOS bytes.
  assert ids[0, 0] == tokenizer.BOS and ids[0, 8] == tokenizer.EOS
  assert np.all(ids[0, 9:] == tokenizer.PAD) and ids[2, -1] == tokenizer.EOS
  assert ids.max() < tok.vocab_size


@functools.cache
def _model_and_params(**kw):
  """The model and its initial parameters, made once per configuration (a jitted init:
  one compilation instead of one per op)."""
  model = clip.CLIP(max_text_len=16, **kw)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                               jnp.zeros((1, 16), jnp.int32))["params"]
  return model, params


def test_clip_outputs_unit_norm_embeddings_and_clamped_temperature():
  model, params = _model_and_params()
  tokens = jnp.asarray(tokenizer.ByteTokenizer(16).encode(["a one", "a two", "a three"]))
  big = {**params, "logit_scale": jnp.float32(10.0)}
  apply = jax.jit(lambda p, images, tokens: model.apply({"params": p}, images, tokens))
  out = apply(params, jnp.ones((3, 28, 28, 1)), tokens)
  assert out["image_emb"].shape == out["text_emb"].shape == (3, 64)
  np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out["text_emb"], axis=1), 1.0, rtol=1e-5)
  assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
  assert float(apply(big, jnp.ones((3, 28, 28, 1)), tokens)["logit_scale"]) == pytest.approx(100.0)


def test_text_embedding_ignores_padding_after_eos():
  model, params = _model_and_params()
  tokens = np.asarray(tokenizer.ByteTokenizer(16).encode(["a one"]))
  other = tokens.copy()
  other[0, 8:] = 77  # Junk after EOS.
  f = jax.jit(lambda t: model.apply({"params": params}, t, method=model.encode_text))
  np.testing.assert_allclose(f(tokens), f(other), rtol=1e-5, atol=1e-6)


def test_sigmoid_variant_and_weight_decay_mask():
  _, params = _model_and_params(sigmoid=True)
  assert float(params["logit_scale"]) == pytest.approx(math.log(10.0))
  assert float(params["logit_bias"]) == -10.0
  mask = clip.weight_decay_mask(params)
  assert not mask["logit_scale"] and not mask["logit_bias"]
  assert mask["image_proj"]["kernel"] and not mask["image_tower"]["encoder"]["ln_final"]["scale"]


def test_unknown_vit_variant_and_bad_image_size():
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    vit.parse_variant("XXL/3")
  assert vit.parse_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch=16)
  with pytest.raises(ValueError, match="divisible by 4"):
    vit.ViT("mu/4").init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 1)))
