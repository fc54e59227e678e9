"""Vision Transformer image encoder, sized by a variant string such as "B/16"."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import transformer

# name: (width, depth, mlp_dim, heads). "mu" is a CPU-sized model for 28x28 images.
VARIANTS = {
    "mu": (64, 2, 256, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def parse_variant(variant: str) -> dict:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch=16)."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"Unknown ViT variant {variant!r}: use NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)}, e.g. 'B/16' or 'mu/4'.")
  width, depth, mlp_dim, heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch=int(patch))


class ViT(nn.Module):
  """[batch, height, width, channels] -> [batch, width] (class token or mean of tokens).

  `pool="none"` returns every token instead, [batch, (1 +) patches, width]: the
  vision encoder of a VLM or of ImageBERT's regions. A class token is there when
  `class_token` says so (default: only for pool="tok"); the parameters are the same
  whatever the pooling ("embedding", "pos_embedding", "cls" with a class token,
  "encoder"), so a tower trained in one place (CLIP) loads in another.
  """
  variant: str = "mu/4"
  pool: str = "tok"  # "tok": the class token; "gap": mean over patch tokens; "none".
  class_token: bool | None = None  # Default: pool == "tok".

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    v = parse_variant(self.variant)
    p = v["patch"]
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"ViT {self.variant} expects [batch, height, width, channels] with "
                       f"height and width divisible by {p}; got {list(images.shape)}.")
    if self.pool not in ("tok", "gap", "none"):
      raise ValueError(f"ViT: pool={self.pool!r}: use 'tok', 'gap' or 'none'.")
    class_token = self.pool == "tok" if self.class_token is None else self.class_token
    if self.pool == "tok" and not class_token:
      raise ValueError("ViT: pool='tok' needs class_token=True.")
    x = nn.Conv(v["width"], (p, p), strides=(p, p), padding="VALID", name="embedding")(images)
    x = x.reshape(x.shape[0], -1, v["width"])  # [batch, patches, width]
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))
    if class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, v["width"]))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, v["width"])), x], axis=1)
    x = transformer.Encoder(v["depth"], v["num_heads"], v["mlp_dim"], name="encoder")(x)
    if self.pool == "tok":
      return x[:, 0]
    if self.pool == "gap":
      return x[:, int(class_token):].mean(axis=1)
    return x
