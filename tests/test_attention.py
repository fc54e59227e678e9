"""Attention vs a NumPy reference: masks, causal masks, cross-attention, no padding leak."""
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import attention
from mmjax.nn import transformer

RNG = np.random.default_rng(0)


def np_attention(q, k, v, mask):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  m = logits.max(axis=-1, keepdims=True)
  w = np.exp(logits - np.where(np.isfinite(m), m, 0))
  w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-30)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def _qkv(b=2, q_len=5, kv_len=7, h=3, d=4):
  f = lambda *s: RNG.normal(size=s).astype(np.float32)
  return f(b, q_len, h, d), f(b, kv_len, h, d), f(b, kv_len, h, d)


def test_unmasked_and_padding_masked_attention_match_numpy():
  q, k, v = _qkv()
  full = np.ones((2, 1, 5, 7), bool)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v), np_attention(q, k, v, full),
                             rtol=1e-5, atol=1e-6)
  kv_valid = np.array([[True] * 7, [True] * 4 + [False] * 3])
  mask = attention.padding_mask(np.ones((2, 5), bool), kv_valid)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask),
                             np_attention(q, k, v, np.asarray(mask)), rtol=1e-5, atol=1e-6)


def test_causal_mask_matches_numpy_and_shape():
  q, k, v = _qkv(q_len=6, kv_len=6)
  mask = attention.causal_mask(6)
  assert mask.shape == (1, 1, 6, 6)
  np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((6, 6), bool)))
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask),
                             np_attention(q, k, v, np.asarray(mask)), rtol=1e-5, atol=1e-6)
  # The first query sees only the first key: its output is the first value.
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask)[:, 0], v[:, 0], rtol=1e-5)


def test_padded_keys_do_not_leak_and_fully_masked_rows_are_zero():
  q, k, v = _qkv()
  mask = attention.padding_mask(np.array([[1, 1, 1, 1, 0]] * 2, bool),
                                np.array([[1, 1, 1, 0, 0, 0, 0]] * 2, bool))
  out = attention.dot_product_attention(q, k, v, mask)
  k2, v2 = k.copy(), v.copy()
  k2[:, 3:], v2[:, 3:] = 1e3, -1e3  # Change only the padded keys and values.
  out2 = attention.dot_product_attention(q, k2, v2, mask)
  np.testing.assert_allclose(out[:, :4], out2[:, :4], rtol=1e-6)
  assert np.all(np.asarray(out[:, 4]) == 0) and np.all(np.isfinite(out))


def test_cross_attention_module_with_other_length_and_width():
  mha = attention.MultiHeadAttention(num_heads=2)
  x = jnp.asarray(RNG.normal(size=(2, 5, 8)), jnp.float32)      # queries: width 8
  ctx = jnp.asarray(RNG.normal(size=(2, 9, 12)), jnp.float32)   # keys/values: width 12
  params = mha.init(jax.random.PRNGKey(0), x, ctx)
  assert mha.apply(params, x, ctx).shape == (2, 5, 8)
  p = params["params"]
  # The same computation by hand with the module's weights.
  q = np.einsum("blw,whd->blhd", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("blw,whd->blhd", ctx, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("blw,whd->blhd", ctx, p["value"]["kernel"]) + p["value"]["bias"]
  o = np_attention(q, k, v, np.ones((2, 1, 5, 9), bool))
  want = np.einsum("blhd,hdw->blw", o, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(mha.apply(params, x, ctx), want, rtol=1e-4, atol=1e-5)


def test_decoder_block_uses_the_context():
  block = transformer.DecoderBlock(num_heads=2, mlp_dim=16)
  x = jnp.ones((1, 4, 8))
  ctx = jnp.asarray(RNG.normal(size=(1, 6, 8)), jnp.float32)
  params = block.init(jax.random.PRNGKey(0), x, ctx, attention.causal_mask(4))
  a = block.apply(params, x, ctx, attention.causal_mask(4))
  b = block.apply(params, x, ctx * 2.0, attention.causal_mask(4))
  assert a.shape == (1, 4, 8) and not np.allclose(a, b)
