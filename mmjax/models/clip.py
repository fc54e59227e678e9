"""CLIP: an image tower and a text tower projected to one L2-normalised space."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import losses
from mmjax.models.text import TextTransformer
from mmjax.models.vit import ViT


class CLIP(nn.Module):
  """images [b, h, w, c], tokens [b, len] -> {"image_emb", "text_emb", "logit_scale", ...}.

  The temperature is learned as `logit_scale` = log(1 / temperature), initialised to
  log(1 / 0.07) and clamped at log(100) when used. With `sigmoid=True` (SigLIP) it
  starts at log(10) and a learned `logit_bias` starts at -10.
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

  def setup(self):
    self.image_tower = ViT(self.image_variant, pool=self.image_pool)
    self.text_tower = TextTransformer(self.text_width, self.text_depth, self.text_heads,
                                      self.text_mlp_dim, max_len=self.max_text_len)
    self.image_proj = nn.Dense(self.embed_dim, use_bias=False)
    self.text_proj = nn.Dense(self.embed_dim, use_bias=False)
    init = math.log(10.0) if self.sigmoid else math.log(1 / 0.07)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(init), ())
    if self.sigmoid:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), ())

  def encode_image(self, images: jax.Array) -> jax.Array:
    """[b, h, w, c] -> [b, embed_dim], unit norm."""
    return losses.l2_normalise(self.image_proj(self.image_tower(images)))

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """[b, len] -> [b, embed_dim], unit norm."""
    return losses.l2_normalise(self.text_proj(self.text_tower(tokens)))

  def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
    out = {"image_emb": self.encode_image(images), "text_emb": self.encode_text(tokens),
           "logit_scale": jnp.exp(jnp.minimum(self.logit_scale, math.log(100.0)))}
    if self.sigmoid:
      out["logit_bias"] = self.logit_bias
    return out


def weight_decay_mask(params):
  """True for matrices and embeddings; False for biases, norms, logit scale and bias."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)
