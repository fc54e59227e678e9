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
"""
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
  """images [b, H, W, C], tokens [b, T] -> {"itm_logit": [b], "mlm_logits": [b, T, vocab]}.

  PAD tokens are never attended to; `image_valid` [b, image tokens] (default: all) masks
  image tokens the same way. max_len bounds 2 + num_image_tokens + T.
  """
  patch: int = 7  # Patch embeddings: the patch size.
  vision_variant: str | None = None  # Region features: the ViT variant, e.g. "mu/4".
  vision_pool: str = "gap"  # How the ViT pools a region: "gap" or "tok" (vit.ViT's pool).
  image_split: int = 2  # Region features: image_split² cells, one token each.
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 128
  vocab_size: int = VOCAB_SIZE

  def num_image_tokens(self, height: int, width: int) -> int:
    """How many image tokens a height x width image becomes."""
    if self.vision_variant is not None:
      return self.image_split ** 2
    return (height // self.patch) * (width // self.patch)

  def image_tokens(self, images: jax.Array) -> jax.Array:
    """[b, H, W, C] -> [b, num_image_tokens, width]."""
    if self.vision_variant is not None:
      b, s = images.shape[0], self.image_split
      pooled = vit.ViT(self.vision_variant, pool=self.vision_pool, name="vision")(
          vlm.split_image(images, s))  # [b·s², vision width]: one token per cell.
      return nn.Dense(self.width, name="region_projection")(pooled.reshape(b, s * s, -1))
    p = self.patch
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"ImageBERT expects images [batch, height, width, channels] with "
                       f"height and width divisible by patch={p}; got {list(images.shape)}.")
    image = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                    name="patch_embedding")(images)
    return image.reshape(image.shape[0], -1, self.width)  # [b, patches, width]

  @nn.compact
  def __call__(self, images: jax.Array, tokens: jax.Array,
               image_valid: jax.Array | None = None) -> dict[str, jax.Array]:
    image = self.image_tokens(images)
    if image_valid is None:
      image_valid = jnp.ones(image.shape[:2], bool)
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name="token_embedding")
    text_valid = tokens != tokenizer.PAD
    x, valid = fusion.SingleStreamEmbedding(self.max_len, name="input")(
        image, image_valid, embed(tokens), text_valid)
    x = transformer.Encoder(self.depth, self.num_heads, self.mlp_dim, name="encoder")(
        x, fusion.key_padding_mask(valid))

    itm_logit = nn.Dense(1, name="itm_head")(jnp.tanh(nn.Dense(self.width, name="pooler")(x[:, 0])))
    text = x[:, 2 + image.shape[1]:]
    h = nn.LayerNorm(name="mlm_ln")(nn.gelu(nn.Dense(self.width, name="mlm_dense")(text)))
    bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab_size,))
    return {"itm_logit": itm_logit[:, 0], "mlm_logits": embed.attend(h) + bias}
