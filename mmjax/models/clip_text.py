"""CLIP's text encoder in transformers' CLIPTextModel layout: Stable Diffusion's text context.

Token and position embeddings, `num_layers` pre-LayerNorm Transformer layers under a
causal mask (q/k/v/out projections with biases, an MLP of `intermediate_size` with
QuickGELU or GELU), and a final LayerNorm. Module names are transformers' ("embeddings/
token_embedding", "encoder/layers_0/self_attn/q_proj", "final_layer_norm", ...), so that
mmjax.interop.sd_pipeline maps its weights by name.

`clip_skip=k` returns the output of layer num_layers − k through the final LayerNorm
(diffusers' `clip_skip`; 1 is the penultimate layer); the last k layers are not run.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import attention
from mmjax.nn import transformer

# transformers' hidden_act -> mmjax.nn.transformer.ACTIVATIONS.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_new": "gelu",
                  "gelu_pytorch_tanh": "gelu"}


class _SelfAttention(nn.Module):
  """Causal multi-head self-attention: q_proj, k_proj, v_proj, out_proj. [b, n, c] -> same."""
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, c = x.shape
    dense = lambda name: nn.Dense(c, name=name, dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda name: dense(name)(x).reshape(b, n, self.heads, c // self.heads)
    out = attention.dot_product_attention(split("q_proj"), split("k_proj"), split("v_proj"),
                                          is_causal=True)
    return dense("out_proj")(out.reshape(b, n, c))


class _Layer(nn.Module):
  """x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(x)). [b, n, c] -> same."""
  heads: int
  intermediate_size: int
  activation: str
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=self.eps, name=name, **types)
    x = x + _SelfAttention(self.heads, name="self_attn", **types)(norm("layer_norm1")(x))
    mlp = transformer.MlpBlock(self.intermediate_size, self.activation, name="mlp", **types)
    return x + mlp(norm("layer_norm2")(x))


class _Embeddings(nn.Module):
  """ids [b, n] -> token_embedding[ids] + position_embedding[:n], [b, n, c]."""
  vocab_size: int
  hidden_size: int
  max_positions: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **types)(ids)
    pos = nn.Embed(self.max_positions, self.hidden_size, name="position_embedding", **types)
    return x + pos(jnp.arange(ids.shape[1]))[None]


class _Encoder(nn.Module):
  """`num_layers` layers ("layers_0", ...), of which the first `run` are applied."""
  num_layers: int
  heads: int
  intermediate_size: int
  activation: str
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, run: int) -> jax.Array:
    for i in range(run):
      x = _Layer(self.heads, self.intermediate_size, self.activation, self.eps,
                 name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x


class CLIPTextModel(nn.Module):
  """int ids [batch, len <= max_positions] -> float32 [batch, len, hidden_size].

  `activation`: an mmjax.nn.transformer.ACTIVATIONS name ("quick_gelu" for OpenAI's
  CLIP, SD 1.x; "gelu_exact" for open_clip's, SD 2.x; see HF_ACTIVATIONS).
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_heads: int = 12
  num_layers: int = 12
  max_positions: int = 77
  activation: str = "quick_gelu"
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, clip_skip: int = 0) -> jax.Array:
    if ids.ndim != 2 or ids.shape[1] > self.max_positions:
      raise ValueError(f"CLIPTextModel expects ids [batch, len <= {self.max_positions}], got "
                       f"{list(ids.shape)}.")
    if not 0 <= clip_skip < self.num_layers:
      raise ValueError(f"clip_skip={clip_skip}: use 0 (the last layer) to "
                       f"{self.num_layers - 1}.")
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _Embeddings(self.vocab_size, self.hidden_size, self.max_positions, name="embeddings",
                    **types)(ids)
    x = _Encoder(self.num_layers, self.num_heads, self.intermediate_size, self.activation,
                 self.eps, name="encoder", **types)(x, self.num_layers - clip_skip)
    x = nn.LayerNorm(epsilon=self.eps, name="final_layer_norm", **types)(x)
    return x.astype(jnp.float32)
