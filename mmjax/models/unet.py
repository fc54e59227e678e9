"""The latent-diffusion U-Net: a noise predictor conditioned on a timestep and on text.

Residual blocks take a sinusoidal timestep embedding through an MLP; spatial
transformer blocks at chosen resolutions run self-attention over the latent's
positions, cross-attention from those positions (queries) to the text context
(keys and values), and a GEGLU feed-forward. The output projections of the
transformer blocks, the second convolution of each residual branch and the output
convolution are zero-initialised, so at init every block is the identity and the
output is zero.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

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

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = nn.Conv(self.features, (3, 3), name="conv1")(
        nn.swish(nn.GroupNorm(self.groups, name="norm1")(x)))
    h = h + nn.Dense(self.features, name="temb_proj")(nn.swish(temb))[:, None, None, :]
    h = nn.swish(nn.GroupNorm(self.groups, name="norm2")(h))
    h = nn.Conv(self.features, (3, 3), kernel_init=zeros, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name="shortcut")(x)
    return x + h


class GEGLU(nn.Module):
  """Feed-forward [..., width] -> [..., width]: Dense(a·gelu(g)) with [a, g] = Dense(x)."""
  mult: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    a, gate = jnp.split(nn.Dense(2 * self.mult * width, name="fc1")(x), 2, axis=-1)
    return nn.Dense(width, name="fc2")(a * nn.gelu(gate))


class TransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention to context, GEGLU; each residual.

  x [batch, len, width], context [batch, tokens, ctx_width] -> [batch, len, width].
  """
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    x = x + MultiHeadAttention(self.num_heads, name="self_attention")(nn.LayerNorm(name="ln1")(x))
    x = x + MultiHeadAttention(self.num_heads, name="cross_attention")(
        nn.LayerNorm(name="ln2")(x), context)
    return x + GEGLU(name="ff")(nn.LayerNorm(name="ln3")(x))


class SpatialTransformer(nn.Module):
  """x + proj_out(Transformer(proj_in(GN(x)) as h·w tokens, context)), proj_out zero-init.

  x [batch, h, w, c], context [batch, tokens, ctx_width] -> [batch, h, w, c].
  """
  num_heads: int
  groups: int
  depth: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = nn.Dense(c, name="proj_in")(nn.GroupNorm(self.groups, name="norm")(x))
    h = h.reshape(b, height * width, c)
    for i in range(self.depth):
      h = TransformerBlock(self.num_heads, name=f"block{i}")(h, context)
    h = nn.Dense(c, kernel_init=zeros, name="proj_out")(h)
    return x + h.reshape(b, height, width, c)


class UNet(nn.Module):
  """(x_t [b, h, w, c], t [b] int, context [b, tokens, context_dim]) -> [b, h, w, out].

  Level i works at resolution h / 2^i with channels·channel_mult[i] channels;
  h and w must be divisible by 2^(len(channel_mult) − 1). attention_resolutions are
  downsampling factors (1: input resolution, 2: half, ...) at which each residual block
  is followed by a spatial transformer; the middle block always has one.
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

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    self._check_inputs(x, t, context)
    temb = timestep_embedding(t, self.channels)
    temb = nn.Dense(4 * self.channels, name="time_mlp1")(temb)
    temb = nn.Dense(4 * self.channels, name="time_mlp2")(nn.swish(temb))
    attention = lambda name: SpatialTransformer(self.num_heads, self.groups,
                                                self.transformer_depth, name=name)

    h = nn.Conv(self.channels, (3, 3), name="conv_in")(x)
    skips, factor = [h], 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult, self.groups, name=f"down{level}_res{i}")(h, temb)
        if factor in self.attention_resolutions:
          h = attention(f"down{level}_attn{i}")(h, context)
        skips.append(h)
      if level < len(self.channel_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    name=f"down{level}_downsample")(h)
        skips.append(h)
        factor *= 2

    h = ResBlock(h.shape[-1], self.groups, name="mid_res1")(h, temb)
    h = attention("mid_attn")(h, context)
    h = ResBlock(h.shape[-1], self.groups, name="mid_res2")(h, temb)

    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(self.channels * self.channel_mult[level], self.groups,
                     name=f"up{level}_res{i}")(h, temb)
        if factor in self.attention_resolutions:
          h = attention(f"up{level}_attn{i}")(h, context)
      if level > 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # Nearest-neighbour x2.
        h = nn.Conv(h.shape[-1], (3, 3), name=f"up{level}_upsample")(h)
        factor //= 2

    h = nn.swish(nn.GroupNorm(self.groups, name="norm_out")(h))
    return nn.Conv(self.out_channels or x.shape[-1], (3, 3), kernel_init=zeros,
                   name="conv_out")(h)

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
