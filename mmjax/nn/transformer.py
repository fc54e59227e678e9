"""Pre-LayerNorm Transformer blocks: encoder (self-attention) and decoder (+ cross-attention)."""
import flax.linen as nn
import jax

from mmjax.nn.attention import MultiHeadAttention

# The MLP's nonlinearity by name. "gelu" is the tanh approximation (mmjax's default);
# "gelu_exact" is the erf form (PyTorch's nn.GELU, open_clip); "quick_gelu" is
# x * sigmoid(1.702 x) (OpenAI's CLIP).
ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r}: use one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """[..., width] -> [..., width] through a hidden layer of `mlp_dim` (GELU by default)."""
  mlp_dim: int
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    act = activation_fn(self.activation)
    return nn.Dense(width, name="fc2")(act(nn.Dense(self.mlp_dim, name="fc1")(x)))


class EncoderBlock(nn.Module):
  """x + SelfAttention(LN(x)), then + MLP(LN(x)). [batch, len, width] -> same.

  With `cache` and `cache_index` (see `MultiHeadAttention`) the block reads new tokens
  against a key/value cache and returns (x, updated cache): a causal decoder's step.
  `activation` names the MLP's nonlinearity (see ACTIVATIONS); `layernorm_epsilon` is
  Flax's 1e-6 by default, PyTorch's is 1e-5.
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layernorm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, cache: dict | None = None,
               cache_index=None) -> jax.Array | tuple[jax.Array, dict]:
    eps = self.layernorm_epsilon
    h = MultiHeadAttention(self.num_heads, name="attention")(
        nn.LayerNorm(epsilon=eps, name="ln1")(x), mask=mask, cache=cache, cache_index=cache_index)
    if cache is not None:
      h, cache = h
    x = x + h
    x = x + MlpBlock(self.mlp_dim, self.activation, name="mlp")(
        nn.LayerNorm(epsilon=eps, name="ln2")(x))
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
  """`depth` EncoderBlocks and a final LayerNorm. [batch, len, width] -> same."""
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layernorm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.activation, self.layernorm_epsilon,
                       name=f"block{i}")(x, mask)
    return nn.LayerNorm(epsilon=self.layernorm_epsilon, name="ln_final")(x)
