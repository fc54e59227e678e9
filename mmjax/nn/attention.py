"""Scaled dot-product attention, its masks, and a multi-head attention module.

Self-attention: queries, keys and values from one sequence. Cross-attention: queries
from one sequence, keys and values from another, of another length and width (the
decoder of an encoder-decoder Transformer; a U-Net attending to text).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """softmax(q·kᵀ / sqrt(head_dim)) · v, per head.

  Args:
    query: [batch, q_len, heads, head_dim].
    key, value: [batch, kv_len, heads, head_dim].
    mask: bool, broadcastable to [batch, heads, q_len, kv_len]; True = attend.

  Returns:
    [batch, q_len, heads, head_dim]. A query row whose keys are all masked out
    returns zeros (not NaN, not an average of the masked values).
  """
  if query.ndim != 4 or key.shape != value.shape or query.shape[::3] != key.shape[::3]:
    raise ValueError(f"Expected query [b, q, h, d] and key/value [b, kv, h, d] with the same "
                     f"b, h, d; got {query.shape}, {key.shape}, {value.shape}.")
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(query.shape[-1]).astype(query.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = weights * jnp.any(mask, axis=-1, keepdims=True)  # Fully masked rows -> 0.
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


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
  to [batch, q_len, out_features or q_width].

  Decoding with a key/value cache (self-attention only): pass `cache` = {"k", "v"},
  each [batch, max_len, heads, head_dim], and `cache_index`, the absolute position of
  the first of the q_len new tokens. Their keys and values are written into the cache
  there, the queries attend to the whole cache (`mask` [batch, 1, q_len, max_len] says
  which entries they see), and the call returns (out, updated cache).
  """
  num_heads: int
  head_dim: int | None = None  # Default: q_width / num_heads.
  out_features: int | None = None
  out_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None,
               mask: jax.Array | None = None, cache: dict | None = None,
               cache_index=None) -> jax.Array | tuple[jax.Array, dict]:
    if cache is not None and inputs_kv is not None:
      raise ValueError("MultiHeadAttention: a key/value cache is for self-attention; got "
                       "inputs_kv too.")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    width = inputs_q.shape[-1]
    head_dim = self.head_dim or width // self.num_heads
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f"Width {width} does not split into {self.num_heads} heads; set head_dim.")
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), name=name)
    q, k, v = proj("query")(inputs_q), proj("key")(inputs_kv), proj("value")(inputs_kv)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                              cache_index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                              cache_index, 1)
    out = dot_product_attention(q, k, v, mask)
    out = nn.DenseGeneral(self.out_features or width, axis=(-2, -1), kernel_init=self.out_init,
                          name="out")(out)
    return out if cache is None else (out, {"k": k, "v": v})
