"""The latent-diffusion U-Net: a noise predictor conditioned on a timestep and on text.

Residual blocks take a sinusoidal timestep embedding through an MLP; spatial
transformer blocks at chosen resolutions run self-attention over the latent's
positions, cross-attention from those positions (queries) to the text context
(keys and values), and a GEGLU feed-forward. The output projections of the
transformer blocks, the second convolution of each residual branch and the output
convolution are zero-initialised, so at init every block is the identity and the
output is zero.

Every module takes `dtype` (computation) and `param_dtype` (parameters), float32 by
default (see mmjax.nn.precision); the timestep embedding, GroupNorm/LayerNorm statistics,
the attention softmax and the U-Net's output (the predicted noise) are float32. `remat`
recomputes each ResBlock and SpatialTransformer in the backward pass.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import precision
from mmjax.nn.attention import MultiHeadAttention

zeros = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding [batch] -> [batch, dim]: cos(t·f_i) then sin(t·f_i).

  Frequencies f_i = max_period^(−i / (dim/2)), i = 0..dim/2 − 1 (dim must be even).
  """
  if dim % 2:
    raise ValueError(f"Timestep embedding width must be even, got {dim}.")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nn.Module):
  """x + conv(GN-swish(conv(GN-swish(x)) + Dense(temb))), 1x1 shortcut if widths differ.

  x [batch, h, w, c], temb [batch, d] -> [batch, h, w, features].
  """
  features: int
  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.GroupNorm(self.groups, name=name, **types)
    h = nn.Conv(self.features, (3, 3), name="conv1", **types)(nn.swish(norm("norm1")(x)))
    temb = nn.Dense(self.features, name="temb_proj", **types)(nn.swish(temb))
    h = nn.swish(norm("norm2")(h + temb[:, None, None, :]))
    h = nn.Conv(self.features, (3, 3), kernel_init=zeros, name="conv2", **types)(h)
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name="shortcut", **types)(x)
    return x + h


class GEGLU(nn.Module):
  """Feed-forward [..., width] -> [..., width]: Dense(a·gelu(g)) with [a, g] = Dense(x)."""
  mult: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    a, gate = jnp.split(nn.Dense(2 * self.mult * width, name="fc1", **types)(x), 2, axis=-1)
    return nn.Dense(width, name="fc2", **types)(a * nn.gelu(gate))


class TransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to context, GEGLU; each residual.

  x [batch, len, width], context [batch, tokens, ctx_width] -> [batch, len, width].
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attend = lambda name: MultiHeadAttention(self.num_heads, name=name, **types)
    norm = lambda name: nn.LayerNorm(name=name, **types)
    x = x + attend("self_attention")(norm("ln1")(x))
    x = x + attend("cross_attention")(norm("ln2")(x), context)
    return x + GEGLU(name="ff", **types)(norm("ln3")(x))


class SpatialTransformer(nn.Module):
  """x + proj_out(Transformer(proj_in(GN(x)) as h·w tokens, context)), proj_out zero-init.

  x [batch, h, w, c], context [batch, tokens, ctx_width] -> [batch, h, w, c].
  """
  num_heads: int
  groups: int
  depth: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(c, name="proj_in", **types)(nn.GroupNorm(self.groups, name="norm", **types)(x))
    h = h.reshape(b, height * width, c)
    for i in range(self.depth):
      h = TransformerBlock(self.num_heads, name=f"block{i}", **types)(h, context)
    h = nn.Dense(c, kernel_init=zeros, name="proj_out", **types)(h)
    return x + h.reshape(b, height, width, c)


class UNet(nn.Module):
  """(x_t [b, h, w, c], t [b] int, context [b, tokens, context_dim]) -> [b, h, w, out].

  Level i works at resolution h / 2^i with channels·channel_mult[i] channels;
  h and w must be divisible by 2^(len(channel_mult) − 1). attention_resolutions are
  downsampling factors (1: input resolution, 2: half, ...) at which each residual block
  is followed by a spatial transformer; the middle block always has one.

  Returns float32 whatever `dtype` is; `remat`: see the module docstring.
  """
  channels: int = 32
  channel_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  attention_resolutions: tuple[int, ...] = (2,)
  num_heads: int = 4
  groups: int = 8
  context_dim: int | None = None  # If set, the context's width is checked against it.
  transformer_depth: int = 1
  out_channels: int | None = None  # Default: the input's channels.
  remat: str = "none"  # "none", "full" or a jax.checkpoint_policies name.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    self._check_inputs(x, t, context)
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda features, name, **kw: nn.Conv(features, (3, 3), name=name, **kw, **types)
    temb = timestep_embedding(t, self.channels)
    temb = nn.Dense(4 * self.channels, name="time_mlp1", **types)(temb)
    temb = nn.Dense(4 * self.channels, name="time_mlp2", **types)(nn.swish(temb))
    res_cls = precision.remat(ResBlock, self.remat)
    attn_cls = precision.remat(SpatialTransformer, self.remat)
    res = lambda features, name: res_cls(features, self.groups, name=name, **types)
    attention = lambda name: attn_cls(self.num_heads, self.groups, self.transformer_depth,
                                      name=name, **types)

    h = conv(self.channels, "conv_in")(x)
    skips, factor = [h], 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res(self.channels * mult, f"down{level}_res{i}")(h, temb)
        if factor in self.attention_resolutions:
          h = attention(f"down{level}_attn{i}")(h, context)
        skips.append(h)
      if level < len(self.channel_mult) - 1:
        h = conv(h.shape[-1], f"down{level}_downsample", strides=(2, 2),
                 padding=((1, 1), (1, 1)))(h)
        skips.append(h)
        factor *= 2

    h = res(h.shape[-1], "mid_res1")(h, temb)
    h = attention("mid_attn")(h, context)
    h = res(h.shape[-1], "mid_res2")(h, temb)

    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.channels * self.channel_mult[level], f"up{level}_res{i}")(h, temb)
        if factor in self.attention_resolutions:
          h = attention(f"up{level}_attn{i}")(h, context)
      if level > 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # Nearest-neighbour x2.
        h = conv(h.shape[-1], f"up{level}_upsample")(h)
        factor //= 2

    h = nn.swish(nn.GroupNorm(self.groups, name="norm_out", **types)(h))
    out = conv(self.out_channels or x.shape[-1], "conv_out", kernel_init=zeros)(h)
    return out.astype(jnp.float32)

  def _check_inputs(self, x, t, context):
    f = 2 ** (len(self.channel_mult) - 1)
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"UNet expects x of shape [batch, height, width, channels] with height "
                       f"and width divisible by {f}; got {list(x.shape)}.")
    if t.shape != x.shape[:1]:
      raise ValueError(f"UNet expects t of shape [batch] = {[x.shape[0]]}, got {list(t.shape)}.")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or (
        self.context_dim is not None and context.shape[-1] != self.context_dim):
      want = self.context_dim or "width"
      raise ValueError(f"UNet expects context of shape [{x.shape[0]}, tokens, {want}], "
                       f"got {list(context.shape)}.")
