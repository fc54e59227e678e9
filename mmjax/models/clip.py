"""CLIP: an image tower and a text tower projected to one L2-normalised space."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import losses
from mmjax.data import tokenizer
from mmjax.models.text import TextTransformer
from mmjax.models import vit


class CLIP(nn.Module):
  """images [b, h, w, c], tokens [b, len] -> {"image_emb", "text_emb", "logit_scale", ...}.

  The temperature is learned as `logit_scale` = log(1 / temperature), initialised to
  log(1 / 0.07) and clamped at log(100) when used. With `sigmoid=True` (SigLIP) it
  starts at log(10) and a learned `logit_bias` starts at -10.

  `openai_layout=True` is the architecture of OpenAI's CLIP and open_clip's ViT CLIPs:
  bias-free patch embedding, a position embedding on the class token too, a LayerNorm
  before the image encoder (`ln_pre`) and after it (the encoder's final LayerNorm is
  `ln_post`), the text pooled at its highest token id (the end-of-text token), LayerNorm
  epsilon 1e-5, and `activation` "quick_gelu" (OpenAI's weights and open_clip's
  "-quickgelu" models) or "gelu_exact" (open_clip's others). `image_dims` sizes the image
  tower freely; mmjax.interop.open_clip sets all of these from a checkpoint. The defaults
  keep mmjax's own layout and parameters.

  Options for other checkpoints' layouts (mmjax.interop.hf_clip sets them), each
  default keeping the layouts above: `layernorm_epsilon` (None: 1e-5 with openai_layout,
  else 1e-6), `text_pool` ("eos", "argmax" or "last"; None: "argmax" with openai_layout,
  else "eos"), `text_eos_id` (the id pool "eos" looks for; None: mmjax's EOS),
  `text_causal`, `text_proj_bias`, `image_projection` (False: no image projection, the
  image tower's width is `embed_dim`) and `clamp_logit_scale`. SigLIP is mmjax's own
  image layout with image_pool="map", text_pool="last", text_causal=False,
  text_proj_bias=True, image_projection=False, sigmoid=True, clamp_logit_scale=False.

  `dtype` (computation) and `param_dtype` (parameters) go to both towers and the
  projections (see mmjax.nn.precision); the embeddings are projected, cast to float32
  and normalised in float32, and `logit_scale` / `logit_bias` are float32 parameters
  whatever `param_dtype` is, so the contrastive logits and losses are float32.
  `dropout_rate`, `remat` and `scan_layers` go to both towers (see vit.ViT); call with
  `deterministic=False` and the "dropout" rng to train with dropout; `patch_dropout`
  (FLIP) goes to the image tower and acts there in training only.
  """
  image_variant: str = "mu/4"
  image_pool: str = "tok"
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  text_mlp_dim: int = 256
  max_text_len: int = 32
  embed_dim: int = 64
  sigmoid: bool = False
  image_dims: tuple[int, int, int, int] | None = None  # (width, depth, mlp_dim, heads).
  text_vocab_size: int = tokenizer.VOCAB_SIZE
  openai_layout: bool = False
  activation: str = "gelu"  # The MLPs' nonlinearity: see transformer.ACTIVATIONS.
  dropout_rate: float = 0.0
  remat: str = "none"  # "none", "full" or a jax.checkpoint_policies name.
  scan_layers: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layernorm_epsilon: float | None = None  # None: 1e-5 with openai_layout, else 1e-6.
  text_pool: str | None = None  # None: "argmax" with openai_layout, else "eos".
  text_eos_id: int | None = None  # None: mmjax's tokenizer.EOS.
  text_causal: bool = True
  text_proj_bias: bool = False
  image_projection: bool = True
  clamp_logit_scale: bool = True  # exp(logit_scale) at most 100.
  patch_dropout: float = 0.0  # Share of image patches dropped in training (vit.ViT).

  def __post_init__(self):
    super().__post_init__()
    vit.check_patch_dropout(self.patch_dropout)

  def setup(self):
    openai = self.openai_layout
    eps = self.layernorm_epsilon or (1e-5 if openai else 1e-6)
    shared = dict(activation=self.activation, layernorm_epsilon=eps,
                  dropout_rate=self.dropout_rate, remat=self.remat,
                  scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype)
    layout = vit.openai_options(self.activation) if openai else {}
    layout.update(layernorm_epsilon=eps)
    self.image_tower = vit.ViT(self.image_variant, pool=self.image_pool, dims=self.image_dims,
                               patch_dropout=self.patch_dropout, **{**shared, **layout})
    self.text_tower = TextTransformer(self.text_width, self.text_depth, self.text_heads,
                                      self.text_mlp_dim, vocab_size=self.text_vocab_size,
                                      max_len=self.max_text_len,
                                      pool=self.text_pool or ("argmax" if openai else "eos"),
                                      eos_id=self.text_eos_id, causal=self.text_causal,
                                      **shared)
    proj = lambda bias: nn.Dense(self.embed_dim, use_bias=bias, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
    self.image_proj = proj(False) if self.image_projection else None
    self.text_proj = proj(self.text_proj_bias)
    init = math.log(10.0) if self.sigmoid else math.log(1 / 0.07)
    scalar = lambda name, value: self.param(name, nn.initializers.constant(value), (),
                                            jnp.float32)
    self.logit_scale = scalar("logit_scale", init)
    if self.sigmoid:
      self.logit_bias = scalar("logit_bias", -10.0)

  def encode_image(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """[b, h, w, c] -> float32 [b, embed_dim], unit norm."""
    x = self.image_tower(images, deterministic)
    if self.image_proj is not None:
      x = self.image_proj(x)
    elif x.shape[-1] != self.embed_dim:
      raise ValueError(f"CLIP: image_projection=False needs embed_dim={self.embed_dim} to be "
                       f"the image tower's width, {x.shape[-1]}.")
    return losses.l2_normalise(x.astype(jnp.float32))

  def encode_text(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
    """[b, len] -> float32 [b, embed_dim], unit norm."""
    x = self.text_proj(self.text_tower(tokens, deterministic=deterministic))
    return losses.l2_normalise(x.astype(jnp.float32))

  def scales(self) -> dict[str, jax.Array]:
    """{"logit_scale": exp(logit_scale) (clamped at 100 by default), and "logit_bias" with
    sigmoid}."""
    scale = self.logit_scale
    if self.clamp_logit_scale:
      scale = jnp.minimum(scale, math.log(100.0))
    out = {"logit_scale": jnp.exp(scale)}
    if self.sigmoid:
      out["logit_bias"] = self.logit_bias
    return out

  def __call__(self, images: jax.Array, tokens: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    return {"image_emb": self.encode_image(images, deterministic),
            "text_emb": self.encode_text(tokens, deterministic), **self.scales()}


def weight_decay_mask(params):
  """True for matrices and embeddings; False for biases, norms, logit scale and bias."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)
