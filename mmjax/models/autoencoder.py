"""KL-regularised convolutional autoencoder: images to a small latent grid and back.

The first stage of latent diffusion (Rombach et al. 2022). With the defaults, 28x28
images are edge-padded to 32x32, downsampled by 4 to 8x8x4 latents, and decoded back
and cropped to 28x28. The posterior is a diagonal Gaussian whose log-variance is
clamped to [-30, 20].

`KL_F8` configures it as Stable Diffusion's KL-f8 autoencoder (diffusers'
`AutoencoderKL`: 3-channel images in [-1, 1] to latents 8x smaller with 4 channels);
mmjax.interop.diffusers loads its weights.

Every module takes `dtype` (computation) and `param_dtype` (parameters), float32 by
default (see mmjax.nn.precision); GroupNorm statistics are float32, and what
`AutoencoderKL` returns (moments, reconstructions) is float32. `remat` recomputes each
ResnetBlock and the middle attention in the backward pass.
"""
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import attention
from mmjax.nn import precision

LOGVAR_RANGE = (-30.0, 20.0)
# diffusers' layout: self-attention between two ResnetBlocks in the middle, 1x1 convs
# on the moments and on the latents, one more ResnetBlock per decoder level, and a
# stride-2 downsampling conv padded at the bottom and right only.
DIFFUSERS_LAYOUT = dict(mid_attention=True, quant_convs=True, decoder_extra_block=True,
                        downsample_padding=((0, 1), (0, 1)), pad=0)
# Stable Diffusion's KL-f8 VAE (sd-vae-ft-mse and the SD 1.x/2.x VAEs), 83.7M parameters.
KL_F8 = dict(channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
             out_channels=3, groups=32, **DIFFUSERS_LAYOUT)


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv twice, plus a 1x1 shortcut when the width changes.

  [batch, h, w, c] -> [batch, h, w, features].
  """
  features: int
  groups: int = 8
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda kernel, name: nn.Conv(self.features, kernel, name=name, **types)
    norm = lambda name: nn.GroupNorm(self.groups, name=name, **types)
    h = conv((3, 3), "conv1")(nn.swish(norm("norm1")(x)))
    h = conv((3, 3), "conv2")(nn.swish(norm("norm2")(h)))
    if x.shape[-1] != self.features:
      x = conv((1, 1), "shortcut")(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """x + Attention(GroupNorm(x)) over the h·w positions, one head. [b, h, w, c] -> same."""
  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.GroupNorm(self.groups, name="norm", **types)(x).reshape(b, h * w, c)
    return x + attention.MultiHeadAttention(1, name="attention", **types)(y).reshape(b, h, w, c)


def _middle(h: jax.Array, groups: int, with_attention: bool, remat: str, types: dict):
  """The middle: a ResnetBlock ("mid_block"), or ResnetBlock, attention, ResnetBlock."""
  block = precision.remat(ResnetBlock, remat)
  h = block(h.shape[-1], groups, name="mid_block", **types)(h)
  if with_attention:
    h = precision.remat(SpatialSelfAttention, remat)(groups, name="mid_attention", **types)(h)
    h = block(h.shape[-1], groups, name="mid_block2", **types)(h)
  return h


class Encoder(nn.Module):
  """[batch, H, W, c] -> (mean, logvar), each [batch, H/f, W/f, latent_channels].

  f = 2 ** (len(channel_mult) - 1); logvar is clamped to LOGVAR_RANGE. The options
  after `groups` are diffusers' layout (see DIFFUSERS_LAYOUT).
  """
  channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  latent_channels: int
  groups: int
  mid_attention: bool = False
  quant_conv: bool = False
  downsample_padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array):
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = precision.remat(ResnetBlock, self.remat)
    h = nn.Conv(self.channels, (3, 3), name="conv_in", **types)(x)
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = block(self.channels * mult, self.groups, name=f"down{level}_block{i}", **types)(h)
      if level < len(self.channel_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=self.downsample_padding,
                    name=f"down{level}_downsample", **types)(h)
    h = _middle(h, self.groups, self.mid_attention, self.remat, types)
    h = nn.swish(nn.GroupNorm(self.groups, name="norm_out", **types)(h))
    moments = nn.Conv(2 * self.latent_channels, (3, 3), name="conv_out", **types)(h)
    if self.quant_conv:
      moments = nn.Conv(2 * self.latent_channels, (1, 1), name="quant_conv", **types)(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class Decoder(nn.Module):
  """[batch, h, w, latent_channels] -> [batch, h·f, w·f, out_channels].

  `num_res_blocks` ResnetBlocks per level (one more with `extra_block`, as diffusers').
  """
  channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  out_channels: int
  groups: int
  mid_attention: bool = False
  post_quant_conv: bool = False
  extra_block: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = precision.remat(ResnetBlock, self.remat)
    if self.post_quant_conv:
      z = nn.Conv(z.shape[-1], (1, 1), name="post_quant_conv", **types)(z)
    h = nn.Conv(self.channels * self.channel_mult[-1], (3, 3), name="conv_in", **types)(z)
    h = _middle(h, self.groups, self.mid_attention, self.remat, types)
    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + int(self.extra_block)):
        h = block(self.channels * self.channel_mult[level], self.groups,
                  name=f"up{level}_block{i}", **types)(h)
      if level > 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # Nearest-neighbour x2.
        h = nn.Conv(h.shape[-1], (3, 3), name=f"up{level}_upsample", **types)(h)
    h = nn.swish(nn.GroupNorm(self.groups, name="norm_out", **types)(h))
    return nn.Conv(self.out_channels, (3, 3), name="conv_out", **types)(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
  """Images [batch, H, W, c] <-> latents [batch, (H+2·pad)/f, (W+2·pad)/f, latent_channels].

  f = 2 ** (len(channel_mult) - 1): 4 with the default (1, 2, 2). Images are edge-padded
  by `pad` pixels per side before encoding and the decoder's output is cropped by as
  much, so 28x28 images give 8x8 latents and 28x28 reconstructions.

  `AutoencoderKL(**KL_F8)` is Stable Diffusion's VAE: images [b, H, W, 3] in [-1, 1]
  with H, W divisible by 8, latents [b, H/8, W/8, 4] (multiplied by diffusers'
  `scaling_factor`, 0.18215 for SD 1.x/2.x, before diffusion). The options after `pad`
  are diffusers' layout (DIFFUSERS_LAYOUT) and add parameters only when set.
  `dtype`, `param_dtype` and `remat`: see the module docstring.
  """
  channels: int = 32
  channel_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 1
  latent_channels: int = 4
  out_channels: int = 1
  groups: int = 8
  pad: int = 2
  mid_attention: bool = False  # Self-attention between two ResnetBlocks in the middle.
  quant_convs: bool = False  # 1x1 convs on the moments ("quant_conv") and latents.
  decoder_extra_block: bool = False  # num_res_blocks + 1 ResnetBlocks per decoder level.
  downsample_padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
  remat: str = "none"  # "none", "full" or a jax.checkpoint_policies name.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    options = dict(remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self.channels, self.channel_mult, self.num_res_blocks,
                           self.latent_channels, self.groups, self.mid_attention,
                           self.quant_convs, self.downsample_padding, **options)
    self.decoder = Decoder(self.channels, self.channel_mult, self.num_res_blocks,
                           self.out_channels, self.groups, self.mid_attention,
                           self.quant_convs, self.decoder_extra_block, **options)

  def encode(self, images: jax.Array):
    """[batch, H, W, c] -> (mean, logvar), each [batch, h, w, latent_channels]."""
    p, f = self.pad, 2 ** (len(self.channel_mult) - 1)
    if images.ndim != 4 or (images.shape[1] + 2 * p) % f or (images.shape[2] + 2 * p) % f:
      raise ValueError(f"AutoencoderKL expects [batch, height, width, channels] with "
                       f"height + {2 * p} and width + {2 * p} divisible by {f}; "
                       f"got {list(images.shape)}.")
    return self.encoder(jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge"))

  def decode(self, latents: jax.Array) -> jax.Array:
    """[batch, h, w, latent_channels] -> [batch, h·f − 2·pad, w·f − 2·pad, out_channels]."""
    x = self.decoder(latents)
    p = self.pad
    return x[:, p:x.shape[1] - p, p:x.shape[2] - p] if p else x

  def __call__(self, images: jax.Array, rng: jax.Array | None = None):
    """Reconstructs images through a posterior sample (or its mean when rng is None).

    Returns:
      (reconstruction [batch, H, W, out_channels], mean, logvar [batch, h, w, latent]).
    """
    mean, logvar = self.encode(images)
    z = mean if rng is None else sample_posterior(rng, mean, logvar)
    return self.decode(z), mean, logvar


def sample_posterior(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """z = mean + exp(logvar / 2)·noise; all [batch, h, w, c]."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over [h, w, c]: [batch]."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def reconstruction_loss(reconstruction: jax.Array, images: jax.Array,
                        kind: str = "l1") -> jax.Array:
  """|x̂ − x| ("l1") or (x̂ − x)² ("l2") summed over [H, W, c]: [batch]."""
  diff = reconstruction - images
  if kind == "l1":
    per_pixel = jnp.abs(diff)
  elif kind == "l2":
    per_pixel = jnp.square(diff)
  else:
    raise ValueError(f"Reconstruction loss {kind!r}: use 'l1' or 'l2'.")
  return jnp.sum(per_pixel, axis=tuple(range(1, diff.ndim)))


def autoencoder_loss(reconstruction: jax.Array, images: jax.Array, mean: jax.Array,
                     logvar: jax.Array, kl_weight: float = 1e-6, kind: str = "l1") -> jax.Array:
  """[batch] reconstruction loss (summed over pixels) + kl_weight · KL (summed over latents).

  Sums, not means, as in latent diffusion's first stage, where kl_weight = 1e-6.
  """
  return reconstruction_loss(reconstruction, images, kind) + kl_weight * kl_divergence(
      mean, logvar)


def latent_scale_factor(latents) -> float:
  """1 / std of latents [n, h, w, c] (over every element): gives the diffusion unit variance."""
  return 1.0 / float(np.std(np.asarray(latents, np.float64)))


def estimate_latent_scale(encode_fn: Callable[[jax.Array], jax.Array],
                          batches: Iterable[jax.Array]) -> float:
  """1 / std of encode_fn's latents over a stream of image batches.

  Args:
    encode_fn: images [batch, H, W, c] -> latents [batch, h, w, c], e.g. a jitted
      posterior mean or sample of `AutoencoderKL.encode`.
    batches: iterable of image batches from the training data.

  Returns:
    The scale factor, accumulated in float64 without holding all latents.
  """
  count, total, total_sq = 0, 0.0, 0.0
  for images in batches:
    z = np.asarray(encode_fn(images), np.float64)
    count, total, total_sq = count + z.size, total + z.sum(), total_sq + np.square(z).sum()
  if not count:
    raise ValueError("estimate_latent_scale needs at least one batch.")
  mean = total / count
  return 1.0 / float(np.sqrt(max(total_sq / count - mean**2, 1e-12)))
