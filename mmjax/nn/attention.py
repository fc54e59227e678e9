"""Scaled dot-product attention, its masks, and a multi-head attention module.

Self-attention: queries, keys and values from one sequence. Cross-attention: queries
from one sequence, keys and values from another, of another length and width (the
decoder of an encoder-decoder Transformer; a U-Net attending to text).

`dot_product_attention` runs `jax.nn.dot_product_attention`: by default ("auto")
cuDNN's fused (flash) attention on a GPU for bfloat16/float16 inputs where JAX accepts
them for it, XLA's attention otherwise; its softmax is float32 whatever the dtype of
q, k and v.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _as_4d_mask(mask: jax.Array) -> jax.Array:
  """A bool mask with up to 4 dims -> 4 dims, leading ones added."""
  mask = jnp.asarray(mask, bool)
  if mask.ndim > 4:
    raise ValueError(f"An attention mask broadcasts to [batch, heads, q_len, kv_len]; got "
                     f"shape {mask.shape}.")
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _weights(query, key, mask) -> jax.Array:
  """softmax(q·kᵀ / sqrt(head_dim)) [batch, heads, q_len, kv_len], float32, masked; as
  head-major batched matmuls, which XLA's CPU backend runs about twice as fast as the
  [b, len, h, d] einsum (benchmarks/README.md, Stable Diffusion generation)."""
  q, k = (jnp.swapaxes(x, 1, 2) for x in (query, key))
  logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(query.shape[-1]))
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def _apply(weights, value) -> jax.Array:
  """weights [b, h, q, k] · value [b, k, h, d] -> [b, q, h, d], in the value's dtype."""
  return jnp.swapaxes(jnp.matmul(weights.astype(value.dtype), jnp.swapaxes(value, 1, 2)), 1, 2)


def _weights_with_dropout(query, key, value, mask, rate: float, rng: jax.Array) -> jax.Array:
  """The attention with its weights computed explicitly and dropped out at `rate`.

  Same shapes and dtypes as `dot_product_attention`; logits and softmax in float32.
  """
  weights = _weights(query, key, mask)
  keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
  return _apply(jnp.where(keep, weights / (1.0 - rate), 0.0), value)


def _backend() -> str:
  """The backend `implementation="auto"` chooses for: `jax.default_backend()` when traced."""
  return jax.default_backend()


# On the CPU, keys from this many on: `_head_major_attention` (Stable Diffusion's 32x32
# and 64x64 latents); fewer (CLIP's 50 patches, text): XLA's, a few % faster there.
HEAD_MAJOR_MIN_KV_LEN = 256


def _head_major_attention(query, key, value, mask, is_causal: bool) -> jax.Array:
  """jax.nn.dot_product_attention's XLA math through `_weights` (the CPU's faster layout)."""
  if is_causal:
    causal = causal_mask(query.shape[1], key.shape[1])
    mask = causal if mask is None else mask & causal
  return _apply(_weights(query, key, mask), value)


def _fused_attention(query, key, value, mask, is_causal: bool, implementation: str | None):
  """jax.nn.dot_product_attention; "auto": cuDNN on a GPU for half-precision inputs,
  unless JAX refuses the shapes, mask or version for it while tracing; on the CPU
  `_head_major_attention`; else XLA."""
  attend = lambda impl: jax.nn.dot_product_attention(query, key, value, mask=mask,
                                                     is_causal=is_causal, implementation=impl)
  if implementation != "auto":
    return attend(implementation)
  if _backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return attend("cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      pass  # Head size, mask or cuDNN version not supported: XLA's attention.
  if _backend() == "cpu" and key.shape[1] >= HEAD_MAJOR_MIN_KV_LEN:
    return _head_major_attention(query, key, value, mask, is_causal)
  return attend(None)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None, *, is_causal: bool = False,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                          implementation: str | None = "auto") -> jax.Array:
  """softmax(q·kᵀ / sqrt(head_dim)) · v, per head.

  Args:
    query: [batch, q_len, heads, head_dim].
    key, value: [batch, kv_len, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q_len, kv_len]; True = attend.
    is_causal: query i attends only to keys j <= i + kv_len - q_len (`causal_mask`'s
      rule), on top of `mask`. Without a mask and with q_len == kv_len it is
      `jax.nn.dot_product_attention`'s own `is_causal`, which cuDNN computes without a
      mask array.
    dropout_rate, dropout_rng: with a key and a rate > 0, each attention weight is
      dropped with probability `dropout_rate` (the kept ones scaled by 1 / (1 - rate));
      the weights are then computed explicitly, not by jax.nn.dot_product_attention.
    implementation: "auto" (cuDNN on a GPU for float16/bfloat16 inputs where JAX accepts
      them for it while tracing; on the CPU from HEAD_MAJOR_MIN_KV_LEN keys the same
      math as XLA's as head-major batched matmuls, faster there; XLA otherwise), or jax.nn.dot_product_attention's own:
      None (XLA in jax 0.10), "xla" or "cudnn" (GPU only; refused shapes raise).

  Returns:
    [batch, q_len, heads, head_dim], in the dtype of q, k and v (cast to their common
    one). The logits and the softmax are float32 whatever that dtype is; the weights are
    cast to it for the product with v. A query row whose keys are all masked out
    returns zeros (not NaN, not an average of the masked values).
  """
  if (query.ndim != 4 or key.shape != value.shape or query.shape[0] != key.shape[0]
      or query.shape[2:] != key.shape[2:]):
    raise ValueError(f"Expected query [b, q, h, d] and key/value [b, kv, h, d] with the same "
                     f"b, h, d; got {query.shape}, {key.shape}, {value.shape}.")
  dtype = jnp.result_type(query, key, value)
  query, key, value = (x.astype(dtype) for x in (query, key, value))
  q_len, kv_len = query.shape[1], key.shape[1]
  mask = None if mask is None else _as_4d_mask(mask)
  native_causal = is_causal and mask is None and q_len == kv_len
  if is_causal and not native_causal:
    causal = causal_mask(q_len, kv_len)
    mask = causal if mask is None else mask & causal
  if dropout_rate > 0.0 and dropout_rng is not None:
    out = _weights_with_dropout(query, key, value, mask, dropout_rate, dropout_rng)
  else:
    out = _fused_attention(query, key, value, mask, native_causal, implementation)
  if mask is None:
    return out
  attends = jnp.any(mask, axis=-1)  # [b, h, q] (or 1s where the mask broadcasts).
  return jnp.where(jnp.swapaxes(attends, 1, 2)[..., None], out, jnp.zeros((), out.dtype))


def causal_mask(q_len: int, kv_len: int | None = None) -> jax.Array:
  """[1, 1, q_len, kv_len] bool: query i attends to keys j <= i (aligned at the end)."""
  kv_len = q_len if kv_len is None else kv_len
  q = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  return (jnp.arange(kv_len)[None, :] <= q)[None, None]


def padding_mask(q_valid: jax.Array, kv_valid: jax.Array) -> jax.Array:
  """[batch, q_len], [batch, kv_len] bool -> [batch, 1, q_len, kv_len]: both positions real."""
  return (q_valid[:, None, :, None] & kv_valid[:, None, None, :])


class MultiHeadAttention(nn.Module):
  """Multi-head attention: self-attention, or cross-attention when `inputs_kv` is given.

  Maps queries [batch, q_len, q_width] and keys/values [batch, kv_len, kv_width]
  to [batch, q_len, out_features or q_width], in `dtype`.

  Decoding with a key/value cache (self-attention only): pass `cache` = {"k", "v"},
  each [batch, max_len, heads, head_dim], and `cache_index`, the absolute position of
  the first of the q_len new tokens. Their keys and values are written into the cache
  there, the queries attend to the whole cache (`mask` [batch, 1, q_len, max_len] says
  which entries they see), and the call returns (out, updated cache).

  `causal=True` adds the causal rule to `mask` (see `dot_product_attention`); not with
  a cache, whose mask says what each query sees. `dropout_rate` drops attention weights
  when `deterministic=False` (needs the "dropout" rng). `dtype` is the computation
  dtype, `param_dtype` the parameters' (see mmjax.nn.precision); the softmax is float32.
  """
  num_heads: int
  head_dim: int | None = None  # Default: q_width / num_heads.
  out_features: int | None = None
  out_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dropout_rate: float = 0.0
  causal: bool = False
  implementation: str | None = "auto"  # See dot_product_attention: "auto", None, "xla", "cudnn".
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, cache: dict | None = None,
               cache_index=None, deterministic: bool = True) -> jax.Array | tuple[jax.Array, dict]:
    if cache is not None and (inputs_kv is not None or self.causal):
      raise ValueError("MultiHeadAttention: a key/value cache is for self-attention, with the "
                       "cache's mask (causal=False); got inputs_kv or causal=True too.")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    width = inputs_q.shape[-1]
    head_dim = self.head_dim or width // self.num_heads
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f"Width {width} does not split into {self.num_heads} heads; set head_dim.")
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), name=name, **dense)
    q, k, v = proj("query")(inputs_q), proj("key")(inputs_kv), proj("value")(inputs_kv)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                              cache_index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                              cache_index, 1)
    dropout = self.dropout_rate > 0.0 and not deterministic
    out = dot_product_attention(q, k, v, mask, is_causal=self.causal,
                                dropout_rate=self.dropout_rate,
                                dropout_rng=self.make_rng("dropout") if dropout else None,
                                implementation=self.implementation)
    out = nn.DenseGeneral(self.out_features or width, axis=(-2, -1), kernel_init=self.out_init,
                          name="out", **dense)(out)
    return out if cache is None else (out, {"k": k, "v": v})
