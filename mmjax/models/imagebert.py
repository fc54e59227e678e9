"""ImageBERT: one Transformer encoder over `[CLS] image patches [SEP] text tokens`.

Single-stream fusion: image tokens and byte-token embeddings are concatenated, each token
summed with a position and a segment (modality) embedding, and read by one bidirectional
Transformer encoder. The image tokens are either

- patch embeddings (`vision_variant=None`): a linear map of each patch x patch patch; or
- region features, as ImageBERT reads a pretrained detector's regions: the image is cut
  into image_split x image_split cells, each encoded by a ViT (`vision_variant`, with
  `vit.ViT`'s parameters, so a CLIP run's image tower loads into it) and pooled to one
  token, then projected to the encoder's width. The position embedding tells the
  regions apart, as ImageBERT's box-position embedding does.

Two heads:

- image-text matching (ITM): a logit from the [CLS] state, "does this caption describe
  this image?";
- masked language modelling (MLM): the text tokens replaced by [MASK] predicted back
  from the rest of the text *and* the image.

`dtype` (computation) and `param_dtype` (parameters) go to every layer (see
mmjax.nn.precision); both heads' logits are float32. `remat` recomputes each
Transformer block (the encoder's and the ViT's) in the backward pass.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data import tokenizer
from mmjax.models import vit
from mmjax.models import vlm
from mmjax.nn import fusion
from mmjax.nn import transformer

MASK = tokenizer.VOCAB_SIZE  # The [MASK] id, one past the byte tokenizer's vocabulary.
VOCAB_SIZE = tokenizer.VOCAB_SIZE + 1


class ImageBERT(nn.Module):
  """images [b, H, W, C], tokens [b, T] -> float32 {"itm_logit": [b], "mlm_logits": [b, T, vocab]}.

  PAD tokens are never attended to; `image_valid` [b, image tokens] (default: all) masks
  image tokens the same way. max_len bounds 2 + num_image_tokens + T.
  """
  patch: int = 7  # Patch embeddings: the patch size.
  vision_variant: str | None = None  # Region features: the ViT variant, e.g. "mu/4".
  vision_pool: str = "gap"  # How the ViT pools a region: "gap" or "tok" (vit.ViT's pool).
  vision_options: tuple = ()  # ViT layout options, as VisionLanguageModel's.
  image_split: int = 2  # Region features: image_split² cells, one token each.
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 128
  vocab_size: int = VOCAB_SIZE
  remat: str = "none"  # "none", "full" or a jax.checkpoint_policies name.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def _types(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def num_image_tokens(self, height: int, width: int) -> int:
    """How many image tokens a height x width image becomes."""
    if self.vision_variant is not None:
      return self.image_split ** 2
    return (height // self.patch) * (width // self.patch)

  def image_tokens(self, images: jax.Array) -> jax.Array:
    """[b, H, W, C] -> [b, num_image_tokens, width]."""
    if self.vision_variant is not None:
      b, s = images.shape[0], self.image_split
      pooled = vit.ViT(self.vision_variant, pool=self.vision_pool, remat=self.remat,
                       name="vision", **vit.layout_options(self.vision_options),
                       **self._types)(
          vlm.split_image(images, s))  # [b·s², vision width]: one token per cell.
      return nn.Dense(self.width, name="region_projection", **self._types)(
          pooled.reshape(b, s * s, -1))
    p = self.patch
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"ImageBERT expects images [batch, height, width, channels] with "
                       f"height and width divisible by patch={p}; got {list(images.shape)}.")
    image = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                    name="patch_embedding", **self._types)(images)
    return image.reshape(image.shape[0], -1, self.width)  # [b, patches, width]

  @nn.compact
  def __call__(self, images: jax.Array, tokens: jax.Array,
               image_valid: jax.Array | None = None) -> dict[str, jax.Array]:
    image = self.image_tokens(images)
    if image_valid is None:
      image_valid = jnp.ones(image.shape[:2], bool)
    types = self._types
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name="token_embedding", **types)
    text_valid = tokens != tokenizer.PAD
    x, valid = fusion.SingleStreamEmbedding(self.max_len, name="input", **types)(
        image, image_valid, embed(tokens), text_valid)
    x = transformer.Encoder(self.depth, self.num_heads, self.mlp_dim, remat=self.remat,
                            name="encoder", **types)(x, fusion.key_padding_mask(valid))

    dense = lambda n, name: nn.Dense(n, name=name, **types)
    itm_logit = dense(1, "itm_head")(jnp.tanh(dense(self.width, "pooler")(x[:, 0])))
    text = x[:, 2 + image.shape[1]:]
    h = nn.LayerNorm(name="mlm_ln", **types)(nn.gelu(dense(self.width, "mlm_dense")(text)))
    bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,), self.param_dtype)
    mlm_logits = embed.attend(h).astype(jnp.float32) + bias.astype(jnp.float32)
    return {"itm_logit": itm_logit[:, 0].astype(jnp.float32), "mlm_logits": mlm_logits}
