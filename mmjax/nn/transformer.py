"""Pre-LayerNorm Transformer blocks: encoder (self-attention) and decoder (+ cross-attention)."""
import flax.linen as nn
import jax

from mmjax.nn.attention import MultiHeadAttention


class MlpBlock(nn.Module):
  """[..., width] -> [..., width] through a GELU hidden layer of `mlp_dim`."""
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    return nn.Dense(width, name="fc2")(nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x)))


class EncoderBlock(nn.Module):
  """x + SelfAttention(LN(x)), then + MLP(LN(x)). [batch, len, width] -> same.

  With `cache` and `cache_index` (see `MultiHeadAttention`) the block reads new tokens
  against a key/value cache and returns (x, updated cache): a causal decoder's step.
  """
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, cache: dict | None = None,
               cache_index=None) -> jax.Array | tuple[jax.Array, dict]:
    h = MultiHeadAttention(self.num_heads, name="attention")(
        nn.LayerNorm(name="ln1")(x), mask=mask, cache=cache, cache_index=cache_index)
    if cache is not None:
      h, cache = h
    x = x + h
    x = x + MlpBlock(self.mlp_dim, name="mlp")(nn.LayerNorm(name="ln2")(x))
    return x if cache is None else (x, cache)


class DecoderBlock(nn.Module):
  """Masked self-attention, cross-attention to `context`, MLP; each pre-LN and residual.

  x: [batch, len, width]; context: [batch, ctx_len, ctx_width] (the encoder's output).
  """
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, self_mask: jax.Array | None = None,
               cross_mask: jax.Array | None = None) -> jax.Array:
    x = x + MultiHeadAttention(self.num_heads, name="self_attention")(
        nn.LayerNorm(name="ln1")(x), mask=self_mask)
    x = x + MultiHeadAttention(self.num_heads, name="cross_attention")(
        nn.LayerNorm(name="ln2")(x), context, mask=cross_mask)
    return x + MlpBlock(self.mlp_dim, name="mlp")(nn.LayerNorm(name="ln3")(x))


class Encoder(nn.Module):
  """`depth` EncoderBlocks and a final LayerNorm."""
  depth: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{i}")(x, mask)
    return nn.LayerNorm(name="ln_final")(x)
