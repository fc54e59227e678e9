"""Vision Transformer image encoder, sized by a variant string such as "B/16"."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import transformer
from mmjax.nn.attention import MultiHeadAttention

# name: (width, depth, mlp_dim, heads). "mu" is a CPU-sized model for 28x28 images.
VARIANTS = {
    "mu": (64, 2, 256, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def parse_variant(variant: str, dims: tuple[int, int, int, int] | None = None) -> dict:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch=16).

  With `dims` = (width, depth, mlp_dim, num_heads) the sizes are those and the variant's
  name is only a label (e.g. "clip/32"): checkpoints of any size load.
  """
  name, _, patch = variant.partition("/")
  if (dims is None and name not in VARIANTS) or not patch.isdigit():
    raise ValueError(f"Unknown ViT variant {variant!r}: use NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)}, e.g. 'B/16' or 'mu/4' (or give dims=(width, depth, "
                     "mlp_dim, num_heads) for other sizes).")
  if dims is not None and (len(dims) != 4 or dims[0] % dims[3]):
    raise ValueError(f"ViT dims={dims}: give (width, depth, mlp_dim, num_heads) with width "
                     "divisible by num_heads.")
  width, depth, mlp_dim, heads = VARIANTS[name] if dims is None else dims
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch=int(patch))


class ViT(nn.Module):
  """[batch, height, width, channels] -> [batch, width] (class token or mean of tokens).

  `pool="map"` pools by attention (`MAPHead`, SigLIP's image tower; no class token by
  default). `pool="none"` returns every token instead, [batch, (1 +) patches, width]: the
  vision encoder of a VLM or of ImageBERT's regions. A class token is there when
  `class_token` says so (default: only for pool="tok"); the parameters are the same
  whatever the pooling ("embedding", "pos_embedding", "cls" with a class token,
  "encoder"), so a tower trained in one place (CLIP) loads in another.

  OpenAI's CLIP layout (open_clip's VisionTransformer) is `patch_bias=False,
  class_pos_embedding=True, ln_pre=True, class_token=True, layernorm_epsilon=1e-5` and
  `activation="quick_gelu"` (OpenAI's weights) or "gelu_exact"; the encoder's final
  LayerNorm is its `ln_post`. `ln_pre` adds the parameters "ln_pre"; the defaults keep
  mmjax's own layout.

  Precision and memory (see mmjax.nn.precision and transformer.Encoder): the ViT
  computes in `dtype` with parameters in `param_dtype` and returns float32;
  `dropout_rate` drops attention weights and residual branches when called with
  `deterministic=False` (the "dropout" rng), and so does `patch_dropout` (FLIP:
  each example keeps a random share 1 - patch_dropout of its patch tokens, the class
  token always; see `drop_patches`); `remat` recomputes each block in the
  backward pass; `scan_layers=True` scans one stacked block (the parameters are then
  "encoder/blocks/..." with a leading [depth] axis, a layout that does not load into
  the unscanned model, nor an open_clip file into it).
  """
  variant: str = "mu/4"
  pool: str = "tok"  # "tok": the class token; "gap": mean of patch tokens; "map"; "none".
  class_token: bool | None = None  # Default: pool == "tok".
  dims: tuple[int, int, int, int] | None = None  # (width, depth, mlp_dim, heads): parse_variant.
  patch_bias: bool = True  # A bias in the patch embedding.
  class_pos_embedding: bool = False  # The position embedding covers the class token too.
  ln_pre: bool = False  # A LayerNorm on the embedded tokens before the encoder.
  activation: str = "gelu"  # The MLPs' nonlinearity: see transformer.ACTIVATIONS.
  layernorm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  remat: str = "none"  # "none", "full" or a jax.checkpoint_policies name.
  scan_layers: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  patch_dropout: float = 0.0  # Share of patch tokens dropped in training: drop_patches.

  def __post_init__(self):
    super().__post_init__()
    check_patch_dropout(self.patch_dropout)

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    v = parse_variant(self.variant, self.dims)
    p = v["patch"]
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"ViT {self.variant} expects [batch, height, width, channels] with "
                       f"height and width divisible by {p}; got {list(images.shape)}.")
    if self.pool not in ("tok", "gap", "map", "none"):
      raise ValueError(f"ViT: pool={self.pool!r}: use 'tok', 'gap', 'map' or 'none'.")
    class_token = self.pool == "tok" if self.class_token is None else self.class_token
    if self.pool == "tok" and not class_token:
      raise ValueError("ViT: pool='tok' needs class_token=True.")
    if self.class_pos_embedding and not class_token:
      raise ValueError("ViT: class_pos_embedding=True needs class_token=True.")
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    param = lambda name, init, shape: self.param(name, init, shape, self.param_dtype).astype(
        self.dtype)
    x = nn.Conv(v["width"], (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                name="embedding", **types)(images)
    x = x.reshape(x.shape[0], -1, v["width"])  # [batch, patches, width]
    pos_shape = (1, x.shape[1] + int(self.class_pos_embedding), v["width"])
    pos = param("pos_embedding", nn.initializers.normal(0.02), pos_shape)
    if not self.class_pos_embedding:
      x = x + pos
    if class_token:
      cls = param("cls", nn.initializers.zeros, (1, 1, v["width"]))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, v["width"])), x], axis=1)
    if self.class_pos_embedding:
      x = x + pos
    if self.patch_dropout and not deterministic:  # FLIP: fewer tokens in training.
      x = drop_patches(x, self.patch_dropout, self.make_rng("dropout"), int(class_token))
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="ln_pre", **types)(x)
    x = transformer.Encoder(v["depth"], v["num_heads"], v["mlp_dim"], self.activation,
                            self.layernorm_epsilon, self.dropout_rate, remat=self.remat,
                            scan_layers=self.scan_layers, name="encoder", **types)(
        x, deterministic=deterministic)
    if self.pool == "tok":
      x = x[:, 0]
    elif self.pool == "gap":
      x = x[:, int(class_token):].mean(axis=1, dtype=jnp.float32)
    elif self.pool == "map":
      x = MAPHead(v["num_heads"], v["mlp_dim"], self.activation, self.layernorm_epsilon,
                  name="head", **types)(x)
    return x.astype(jnp.float32)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends to the tokens, then a residual
  MLP. [batch, len, width] -> [batch, width].

  big_vision's MAPHead and Hugging Face's SiglipMultiheadAttentionPoolingHead: parameters
  "probe" [1, 1, width], "attention" (query from the probe, keys and values from the
  tokens), "ln" and "mlp".
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layernorm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width),
                       self.param_dtype).astype(self.dtype)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, width))
    x = MultiHeadAttention(self.num_heads, name="attention", **types)(probe, x)
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="ln", **types)(x)
    x = x + transformer.MlpBlock(self.mlp_dim, self.activation, name="mlp", **types)(y)
    return x[:, 0]


def check_patch_dropout(rate) -> None:
  """Raises ValueError unless 0 <= rate < 1."""
  if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ValueError(f"patch_dropout={rate!r} (config.model.patch_dropout): the share of "
                     f"patch tokens dropped in training must be in [0, 1).")


def drop_patches(x: jax.Array, rate: float, rng: jax.Array, keep_first: int = 0) -> jax.Array:
  """FLIP's patch dropout: [b, n, w] -> [b, keep_first + k, w].

  Keeps the first `keep_first` tokens (a class token) and, per example, a random
  k = max(1, int((n - keep_first) * (1 - rate))) of the others, in their order.
  """
  b, n, _ = x.shape
  m = n - keep_first
  k = max(1, int(m * (1.0 - rate)))
  scores = jax.random.uniform(rng, (b, m))
  idx = jnp.sort(jax.lax.top_k(scores, k)[1], axis=1) + keep_first  # [b, k]
  kept = jnp.take_along_axis(x, idx[..., None], axis=1)
  return jnp.concatenate([x[:, :keep_first], kept], axis=1)


# ViT options a model with a ViT inside (VLM, ImageBERT) passes through (`vision_options`).
LAYOUT_OPTIONS = ("dims", "patch_bias", "class_pos_embedding", "ln_pre", "class_token",
                  "activation", "layernorm_epsilon")


def openai_options(activation: str) -> dict:
  """ViT's options for OpenAI's CLIP image-tower layout; activation "quick_gelu" or
  "gelu_exact"."""
  return dict(class_token=True, patch_bias=False, class_pos_embedding=True, ln_pre=True,
              layernorm_epsilon=1e-5, activation=activation)


def layout_options(pairs) -> dict:
  """A model's `vision_options`, ((name, value), ...) pairs, -> ViT keyword arguments.

  Pairs rather than a dict keep the module hashable. Raises ValueError for a name that
  is not one of LAYOUT_OPTIONS.
  """
  options = dict(pairs)
  unknown = sorted(set(options) - set(LAYOUT_OPTIONS))
  if unknown:
    raise ValueError(f"vision_options {unknown}: the ViT's layout options are "
                     f"{LAYOUT_OPTIONS}.")
  return options
