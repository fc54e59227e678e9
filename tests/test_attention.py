"""Attention vs a NumPy reference: masks, causal masks, cross-attention, no padding leak."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def old_attention(query, key, value, mask=None):
  """mmjax's attention before it called jax.nn.dot_product_attention (the reference)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(query.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = weights * jnp.any(mask, axis=-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _cases():
  """(name, q_len, kv_len, mask, is_causal): the masks the models use."""
  pad = attention.padding_mask(np.array([[1, 1, 1, 1, 0]] * 2, bool),
                               np.array([[1, 1, 1, 0, 0, 0, 0]] * 2, bool))
  key_pad = np.array([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0]], bool)[:, None, None, :]
  cache = np.arange(7)[None, None, None, :] <= np.array([[3], [5]])[:, None, None]  # [b,1,1,kv]
  return [("self", 5, 5, None, False), ("cross", 5, 7, None, False),
          ("padding, a fully masked row", 5, 7, pad, False),
          ("key padding, a fully masked batch row", 3, 5, key_pad, False),
          ("causal mask", 6, 6, attention.causal_mask(6), False),
          ("is_causal", 6, 6, None, True),
          ("is_causal, kv_len > q_len", 2, 6, None, True),
          ("is_causal and key padding", 5, 5, key_pad, True),
          ("key/value cache", 1, 7, cache, False)]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_jax_attention_equals_the_previous_implementation(case):
  _, q_len, kv_len, mask, is_causal = case
  want_mask = mask
  if is_causal:
    causal = np.asarray(attention.causal_mask(q_len, kv_len))
    want_mask = causal if mask is None else np.asarray(mask) & causal
  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, is_causal=is_causal)
  theirs = lambda q, k, v: old_attention(q, k, v, want_mask)

  @jax.jit
  def outputs_and_grads(q, k, v):
    return [jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
            + (f(q, k, v),) for f in (ours, theirs)]

  (_, grads, out), (_, want_grads, want) = outputs_and_grads(*_qkv(q_len=q_len, kv_len=kv_len))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(out))
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_bfloat16_attention_softmax_is_float32():
  q, k, v = _qkv(q_len=6, kv_len=6)
  mask = attention.causal_mask(6)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  out = attention.dot_product_attention(*bf, mask)
  assert out.dtype == jnp.bfloat16
  # The reference from the same bfloat16-rounded inputs, all in float32.
  want = old_attention(*[x.astype(jnp.float32) for x in bf], mask)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)


def test_attention_dropout_needs_an_rng_only_when_it_drops():
  mha = attention.MultiHeadAttention(num_heads=2, dropout_rate=0.5)
  x = jnp.asarray(RNG.normal(size=(2, 5, 8)), jnp.float32)
  params = mha.init(jax.random.PRNGKey(0), x)
  plain = attention.MultiHeadAttention(num_heads=2).apply(params, x)
  np.testing.assert_allclose(mha.apply(params, x), plain, rtol=1e-6)  # deterministic=True
  drop = jax.jit(lambda seed: mha.apply(params, x, deterministic=False,
                                        rngs={"dropout": jax.random.PRNGKey(seed)}))
  a, b = drop(1), drop(2)
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  with pytest.raises(Exception, match="dropout"):
    mha.apply(params, x, deterministic=False)


def test_auto_implementation_asks_for_cudnn_on_a_gpu_in_half_precision(monkeypatch):
  """"auto": cuDNN for bfloat16 on a GPU, XLA when JAX refuses it or in float32 or on
  other backends, the head-major matmuls on the CPU (a GPU is faked: the backend query is
  patched, and jax's cuDNN attention is replaced by a recorder that refuses, as JAX does
  for unsupported input)."""
  from mmjax.nn import attention as attention_lib
  asked = []
  real = jax.nn.dot_product_attention

  def recorder(*args, implementation=None, **kwargs):
    asked.append(implementation)
    if implementation == "cudnn":
      raise ValueError("cuDNN refuses this input")
    return real(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 2, 8))
  expected = real(q, q, q)
  for backend, dtype, wanted in [("gpu", jnp.bfloat16, ["cudnn", None]),
                                 ("gpu", jnp.float32, [None]), ("tpu", jnp.bfloat16, [None]),
                                 ("cpu", jnp.bfloat16, [None]), ("cpu", jnp.float32, [None])]:
    monkeypatch.setattr(attention_lib, "_backend", lambda b=backend: b)
    asked.clear()
    out = attention_lib.dot_product_attention(q.astype(dtype), q.astype(dtype), q.astype(dtype))
    assert asked == wanted, (backend, dtype)
    np.testing.assert_allclose(out.astype(jnp.float32), expected,
                               atol=3e-2 if dtype == jnp.bfloat16 else 1e-6)
  # Long key sequences on the CPU: the head-major matmuls, the same numbers (with masks).
  n = attention_lib.HEAD_MAJOR_MIN_KV_LEN
  q = jax.random.normal(jax.random.PRNGKey(1), (2, n, 2, 8))
  mask = jax.random.bernoulli(jax.random.PRNGKey(2), 0.7, (2, 1, n, n))
  asked.clear()
  for kwargs in (dict(), dict(mask=mask), dict(is_causal=True)):
    out = attention_lib.dot_product_attention(q, q, q, **kwargs)
    np.testing.assert_allclose(out, real(q, q, q, **kwargs), atol=1e-5)
  assert asked == []
