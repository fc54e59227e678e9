"""Pre-LayerNorm Transformer blocks: encoder (self-attention) and decoder (+ cross-attention).

Every module takes `dtype` (computation) and `param_dtype` (parameters), float32 by
default (see mmjax.nn.precision), and `dropout_rate` (default 0): attention weights
and each residual branch are dropped out when called with `deterministic=False`,
which needs the "dropout" rng (`apply(..., rngs={"dropout": key})`). With rate 0
nothing changes and no rng is needed.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import precision
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
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    act = activation_fn(self.activation)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    return dense(width, "fc2")(act(dense(self.mlp_dim, "fc1")(x)))


class EncoderBlock(nn.Module):
  """x + SelfAttention(LN(x)), then + MLP(LN(x)). [batch, len, width] -> same.

  With `cache` and `cache_index` (see `MultiHeadAttention`) the block reads new tokens
  against a key/value cache and returns (x, updated cache): a causal decoder's step.
  `activation` names the MLP's nonlinearity (see ACTIVATIONS); `layernorm_epsilon` is
  Flax's 1e-6 by default, PyTorch's is 1e-5. `causal` adds the causal rule to the mask.
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layernorm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  causal: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, cache: dict | None = None,
               cache_index=None, deterministic: bool = True) -> jax.Array | tuple[jax.Array, dict]:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=self.layernorm_epsilon, name=name, **types)
    drop = lambda h: nn.Dropout(self.dropout_rate)(h, deterministic)
    h = MultiHeadAttention(self.num_heads, dropout_rate=self.dropout_rate, causal=self.causal,
                           name="attention", **types)(
        norm("ln1")(x), mask=mask, cache=cache, cache_index=cache_index,
        deterministic=deterministic)
    if cache is not None:
      h, cache = h
    x = x + drop(h)
    x = x + drop(MlpBlock(self.mlp_dim, self.activation, name="mlp", **types)(norm("ln2")(x)))
    return x if cache is None else (x, cache)


class DecoderBlock(nn.Module):
  """Masked self-attention, cross-attention to `context`, MLP; each pre-LN and residual.

  x: [batch, len, width]; context: [batch, ctx_len, ctx_width] (the encoder's output).
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, self_mask: jax.Array | None = None,
               cross_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda h: nn.Dropout(self.dropout_rate)(h, deterministic)
    attend = lambda name, *args, **kw: MultiHeadAttention(
        self.num_heads, dropout_rate=self.dropout_rate, name=name, **types)(
            *args, deterministic=deterministic, **kw)
    x = x + drop(attend("self_attention", nn.LayerNorm(name="ln1", **types)(x), mask=self_mask))
    x = x + drop(attend("cross_attention", nn.LayerNorm(name="ln2", **types)(x), context,
                        mask=cross_mask))
    return x + drop(MlpBlock(self.mlp_dim, name="mlp", **types)(
        nn.LayerNorm(name="ln3", **types)(x)))


def _scanned(block: EncoderBlock, x: jax.Array, mask, deterministic: bool, depth: int):
  """`depth` applications of one block whose parameters have a leading [depth] axis."""

  def body(module, carry, mask):
    return module(carry, mask, None, None, deterministic), None

  scan = nn.scan(body, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=nn.broadcast, length=depth)
  return scan(block, x, mask)[0]


class Encoder(nn.Module):
  """`depth` EncoderBlocks and a final LayerNorm. [batch, len, width] -> same.

  `remat` ("none", "full" or a jax.checkpoint_policies name, see mmjax.nn.precision)
  recomputes each block's activations in the backward pass; the parameters are the same.

  `scan_layers=True` runs one block `depth` times under `nn.scan` (one compiled block
  whatever the depth): the parameters are then "blocks/..." with a leading [depth]
  axis instead of "block0/...", "block1/...". Nothing converts one layout into the
  other: a checkpoint, a CLIP tower or an open_clip file of one layout does not load
  into the other (stacking block{i}'s leaves with jnp.stack gives the scanned tree).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layernorm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  causal: bool = False
  remat: str = "none"
  scan_layers: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    # Argument 5 (self is 0) is `deterministic`: a Python bool, static under remat.
    block_cls = precision.remat(EncoderBlock, self.remat, static_argnums=(5,),
                                prevent_cse=not self.scan_layers)
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = lambda name: block_cls(self.num_heads, self.mlp_dim, self.activation,
                                   self.layernorm_epsilon, self.dropout_rate, self.causal,
                                   name=name, **types)
    if self.scan_layers:
      x = _scanned(block("blocks"), x, mask, deterministic, self.depth)
    else:
      for i in range(self.depth):
        x = block(f"block{i}")(x, mask, None, None, deterministic)
    return nn.LayerNorm(epsilon=self.layernorm_epsilon, name="ln_final", **types)(x)
