"""Stable Diffusion's U-Net (diffusers' UNet2DConditionModel): noise prediction from text.

The layout of diffusers' `UNet2DConditionModel` for SD 1.x/2.x, with its module names
("down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_q", ...) so that
mmjax.interop.sd_pipeline maps its weights by name:

  conv_in; down blocks, each `layers` ResnetBlock2Ds (each followed by a
  Transformer2DModel in a cross-attention block) and a stride-2 conv but the last; a
  middle ResnetBlock2D, Transformer2DModel, ResnetBlock2D; up blocks, each `layers + 1`
  ResnetBlock2Ds on the input concatenated with the matching skip (and a
  Transformer2DModel after each in a cross-attention block), nearest-neighbour x2 and a
  conv but the last; GroupNorm, SiLU, conv_out.

Transformer2DModel: GroupNorm (eps 1e-6), proj_in (a 1x1 conv, or a Dense on the h·w
tokens with `use_linear_projection`), BasicTransformerBlocks (LayerNorm, self-attention,
LayerNorm, cross-attention to the text, LayerNorm, GEGLU feed-forward with exact GELU;
each residual), proj_out, plus the input. Attention projections have no bias but the
output's. Head counts are per block, each head of width channels / heads.

Images and latents are NHWC. `dtype` is the computation dtype, `param_dtype` the
parameters'; the output is float32.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import attention

CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
DOWN_BLOCKS, UP_BLOCKS = (CROSS_DOWN, DOWN), (CROSS_UP, UP)
# Stable Diffusion 1.x's U-Net (859.5M parameters); 2.x: heads (5, 10, 20, 20),
# cross_attention_dim=1024, use_linear_projection=True.
SD15 = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=(CROSS_DOWN,) * 3 + (DOWN,), up_block_types=(UP,) + (CROSS_UP,) * 3,
            layers_per_block=(2, 2, 2, 2), heads=(8, 8, 8, 8), transformer_layers=(1, 1, 1, 1),
            cross_attention_dim=768, use_linear_projection=False, groups=32, eps=1e-5)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10_000.0) -> jax.Array:
  """diffusers' get_timestep_embedding: [b] (int or float) -> float32 [b, dim].

  Frequencies exp(−log(max_period)·i / (dim/2 − freq_shift)), i < dim/2; [sin, cos]
  ([cos, sin] with flip_sin_to_cos), zero-padded to an odd dim.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ResnetBlock2D(nn.Module):
  """x + conv2(SiLU(GN(conv1(SiLU(GN(x))) + Dense(SiLU(temb))))), 1x1 conv_shortcut if the
  width changes. x [b, h, w, c], temb [b, d] -> [b, h, w, features]."""
  features: int
  groups: int
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, name=name, **types)
    conv = lambda name: nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name=name,
                                **types)
    h = conv("conv1")(nn.swish(norm("norm1")(x)))
    h = h + nn.Dense(self.features, name="time_emb_proj", **types)(nn.swish(temb))[:, None, None]
    h = conv("conv2")(nn.swish(norm("norm2")(h)))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name="conv_shortcut", **types)(x)
    return x + h


class Attention(nn.Module):
  """Multi-head attention of x [b, n, c] to context [b, m, d] (x itself if None) -> [b, n, c]."""
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = x if context is None else context
    b, n, c = x.shape
    project = lambda name, y: nn.Dense(c, use_bias=False, name=name, **types)(y).reshape(
        b, y.shape[1], self.heads, c // self.heads)
    out = attention.dot_product_attention(project("to_q", x), project("to_k", context),
                                          project("to_v", context))
    return nn.Dense(c, name="to_out_0", **types)(out.reshape(b, n, c))


class GEGLU(nn.Module):
  """[b, n, c] -> [b, n, 4c]: a·gelu(g), [a, g] = proj(x), exact (erf) GELU."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(8 * x.shape[-1], name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    a, gate = jnp.split(h, 2, axis=-1)
    return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU ("net_0") then Dense back to the width ("net_2"). [b, n, c] -> same."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return nn.Dense(x.shape[-1], name="net_2", **types)(GEGLU(name="net_0", **types)(x))


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention, feed-forward; each after a LayerNorm, each residual."""
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **types)
    x = x + Attention(self.heads, name="attn1", **types)(norm("norm1")(x))
    x = x + Attention(self.heads, name="attn2", **types)(norm("norm2")(x), context)
    return x + FeedForward(name="ff", **types)(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  """x [b, h, w, c], context [b, m, d] -> x + proj_out(blocks(proj_in(GN(x)))), [b, h, w, c]."""
  heads: int
  groups: int
  layers: int = 1
  use_linear_projection: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, c = x.shape
    project = ((lambda name: nn.Dense(c, name=name, **types)) if self.use_linear_projection
               else (lambda name: nn.Conv(c, (1, 1), name=name, **types)))
    h = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm", **types)(x)
    if self.use_linear_projection:
      h = project("proj_in")(h.reshape(b, height * width, c))
    else:
      h = project("proj_in")(h).reshape(b, height * width, c)
    for i in range(self.layers):
      h = BasicTransformerBlock(self.heads, name=f"transformer_blocks_{i}", **types)(h, context)
    if self.use_linear_projection:
      h = project("proj_out")(h).reshape(b, height, width, c)
    else:
      h = project("proj_out")(h.reshape(b, height, width, c))
    return x + h


class Downsample2D(nn.Module):
  """A stride-2 3x3 conv ("conv"), padded by `padding` (0: bottom and right by 1 only)."""
  padding: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.padding
    pad = ((p, p), (p, p)) if p else ((0, 1), (0, 1))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=pad, name="conv",
                   dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv ("conv"). [b, h, w, c] -> [b, 2h, 2w, c]."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(x.shape[-1], (3, 3), padding=((1, 1), (1, 1)), name="conv",
                   dtype=self.dtype, param_dtype=self.param_dtype)(x)


class _Block(nn.Module):
  """Shared fields of the down, middle and up blocks (heads = 0: no attention)."""
  features: int
  layers: int
  heads: int
  transformer_layers: int
  groups: int
  eps: float
  use_linear_projection: bool
  resample: bool  # A Downsample2D / Upsample2D at the end.
  downsample_padding: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _res(self, j):
    return ResnetBlock2D(self.features, self.groups, self.eps, name=f"resnets_{j}",
                         dtype=self.dtype, param_dtype=self.param_dtype)

  def _attention(self, j):
    return Transformer2DModel(self.heads, self.groups, self.transformer_layers,
                              self.use_linear_projection, name=f"attentions_{j}",
                              dtype=self.dtype, param_dtype=self.param_dtype)


class DownBlock(_Block):
  """CrossAttnDownBlock2D (heads > 0) or DownBlock2D: (h, temb, context) -> (h, skips)."""

  @nn.compact
  def __call__(self, h, temb, context):
    skips = []
    for j in range(self.layers):
      h = self._res(j)(h, temb)
      if self.heads:
        h = self._attention(j)(h, context)
      skips.append(h)
    if self.resample:
      h = Downsample2D(self.downsample_padding, name="downsamplers_0", dtype=self.dtype,
                       param_dtype=self.param_dtype)(h)
      skips.append(h)
    return h, skips


class MidBlock(_Block):
  """UNetMidBlock2DCrossAttn: ResnetBlock2D, Transformer2DModel, ResnetBlock2D."""

  @nn.compact
  def __call__(self, h, temb, context):
    h = self._attention(0)(self._res(0)(h, temb), context)
    return self._res(1)(h, temb)


class UpBlock(_Block):
  """CrossAttnUpBlock2D (heads > 0) or UpBlock2D: each residual block takes h
  concatenated with the last of `skips` (which it consumes). -> (h, skips left)."""

  @nn.compact
  def __call__(self, h, skips, temb, context):
    skips = list(skips)
    for j in range(self.layers):
      h = self._res(j)(jnp.concatenate([h, skips.pop()], axis=-1), temb)
      if self.heads:
        h = self._attention(j)(h, context)
    if self.resample:
      h = Upsample2D(name="upsamplers_0", dtype=self.dtype, param_dtype=self.param_dtype)(h)
    return h, skips


class UNet2DConditionModel(nn.Module):
  """(latents [b, h, w, in_channels], t [b] or [], context [b, m, cross_attention_dim])
  -> float32 [b, h, w, out_channels].

  t may be fractional (Euler-type schedulers). h and w must be divisible by
  2^(number of blocks − 1). Per block i: block_out_channels[i] channels,
  layers_per_block[i] residual blocks, heads[i] attention heads and
  transformer_layers[i] transformer blocks in each Transformer2DModel (cross-attention
  blocks only); the up blocks take these reversed, the middle the last.
  """
  block_out_channels: tuple[int, ...] = SD15["block_out_channels"]
  down_block_types: tuple[str, ...] = SD15["down_block_types"]
  up_block_types: tuple[str, ...] = SD15["up_block_types"]
  layers_per_block: tuple[int, ...] = SD15["layers_per_block"]
  heads: tuple[int, ...] = SD15["heads"]
  transformer_layers: tuple[int, ...] = SD15["transformer_layers"]
  cross_attention_dim: int = 768
  in_channels: int = 4
  out_channels: int = 4
  use_linear_projection: bool = False
  groups: int = 32
  eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  center_input_sample: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
    self._check_inputs(x, context)
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ch, n = self.block_out_channels, len(self.block_out_channels)
    options = dict(groups=self.groups, eps=self.eps,
                   use_linear_projection=self.use_linear_projection, **types)
    conv = lambda features, k, name: nn.Conv(features, (k, k), padding=k // 2, name=name,
                                             **types)

    if self.center_input_sample:
      x = 2 * x - 1.0
    temb = timestep_embedding(t, ch[0], self.flip_sin_to_cos, self.freq_shift)
    temb = _TimeEmbedding(4 * ch[0], name="time_embedding", **types)(temb.astype(self.dtype))
    h = conv(ch[0], self.conv_in_kernel, "conv_in")(x.astype(self.dtype))
    skips = [h]
    for i, kind in enumerate(self.down_block_types):
      h, more = DownBlock(ch[i], self.layers_per_block[i], self.heads[i] * (kind == CROSS_DOWN),
                          self.transformer_layers[i], resample=i < n - 1,
                          downsample_padding=self.downsample_padding, name=f"down_blocks_{i}",
                          **options)(h, temb, context)
      skips += more
    h = MidBlock(ch[-1], 2, self.heads[-1], self.transformer_layers[-1], resample=False,
                 name="mid_block", **options)(h, temb, context)
    for k, kind in enumerate(self.up_block_types):
      i = n - 1 - k  # The down block this up block mirrors.
      h, skips = UpBlock(ch[i], self.layers_per_block[i] + 1, self.heads[i] * (kind == CROSS_UP),
                         self.transformer_layers[i], resample=k < n - 1, name=f"up_blocks_{k}",
                         **options)(h, skips, temb, context)
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=self.eps, name="conv_norm_out", **types)(h))
    return conv(self.out_channels, self.conv_out_kernel, "conv_out")(h).astype(jnp.float32)

  def _check_inputs(self, x, context):
    f = 2 ** (len(self.block_out_channels) - 1)
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f or x.shape[3] != self.in_channels:
      raise ValueError(f"UNet2DConditionModel expects latents [batch, height, width, "
                       f"{self.in_channels}] with height and width divisible by {f}; got "
                       f"{list(x.shape)}.")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or (
        context.shape[-1] != self.cross_attention_dim):
      raise ValueError(f"UNet2DConditionModel expects context [{x.shape[0]}, tokens, "
                       f"{self.cross_attention_dim}], got {list(context.shape)}.")


class _TimeEmbedding(nn.Module):
  """Dense ("linear_1"), SiLU, Dense ("linear_2"). [b, d] -> [b, features]."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.features, name="linear_1", **types)(x)
    return nn.Dense(self.features, name="linear_2", **types)(nn.swish(x))
