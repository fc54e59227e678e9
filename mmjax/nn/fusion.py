"""Fusion of modalities: by addition, by concatenation, by pooling into a language model.

- *Additive fusion*: a token's input is the sum of what it is (token or patch
  embedding), where it is (position embedding) and which modality or segment it
  belongs to (segment embedding), as in the Transformer's input and BERT/ImageBERT.
- *Concatenation*: one sequence `[CLS] image tokens [SEP] text tokens` read by a single
  Transformer (ImageBERT's single stream), with segment ids and a validity mask so
  that padding of either modality is never attended to.
- *Pooling and projection* (Flamingo, Idefics2): a perceiver resampler turns any number
  of vision hidden states into a fixed number of latent tokens, and a projection MLP
  maps them to a language model's width, ready to be put in front of its text tokens.

The pure functions come first; the linen modules are thin layers over them. The
modules take `dtype` (computation) and `param_dtype` (parameters), float32 by default
(see mmjax.nn.precision), and return `dtype`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import attention
from mmjax.nn import transformer

# Segment ids of the single-stream sequence: [CLS] and the image tokens, then [SEP] and text.
SEGMENT_IMAGE, SEGMENT_TEXT = 0, 1


def additive_fusion(token_emb: jax.Array, position_emb: jax.Array,
                    segment_emb: jax.Array | None = None) -> jax.Array:
  """token + position (+ segment) embeddings, summed.

  Args:
    token_emb: [batch, len, width], what each token is (a word piece, a patch).
    position_emb: [batch or 1, len, width], where it is.
    segment_emb: [batch or 1, len, width] or None, which modality or segment it is in.

  Returns:
    [batch, len, width].
  """
  if token_emb.shape[-2:] != position_emb.shape[-2:]:
    raise ValueError(f"Token embeddings {token_emb.shape} and position embeddings "
                     f"{position_emb.shape} differ in [len, width].")
  out = token_emb + position_emb
  return out if segment_emb is None else out + segment_emb


def concat_image_text(cls_emb: jax.Array, image_emb: jax.Array, image_valid: jax.Array,
                      sep_emb: jax.Array, text_emb: jax.Array,
                      text_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`[CLS] image tokens [SEP] text tokens` as one sequence, with segment ids and validity.

  Args:
    cls_emb, sep_emb: [width], the learned [CLS] and [SEP] embeddings.
    image_emb: [batch, n_image, width]; image_valid: [batch, n_image] bool.
    text_emb: [batch, n_text, width]; text_valid: [batch, n_text] bool.

  Returns:
    tokens [batch, 2 + n_image + n_text, width]; segment_ids, same length, int32
    (SEGMENT_IMAGE for [CLS] and the image, SEGMENT_TEXT for [SEP] and the text); valid,
    same length, bool ([CLS] and [SEP] always valid).
  """
  batch, n_image, width = image_emb.shape
  n_text = text_emb.shape[1]
  if text_emb.shape[0] != batch or text_emb.shape[2] != width:
    raise ValueError(f"Image tokens {image_emb.shape} and text tokens {text_emb.shape} must "
                     f"share batch and width.")
  if image_valid.shape != (batch, n_image) or text_valid.shape != (batch, n_text):
    raise ValueError(f"Masks {image_valid.shape}, {text_valid.shape} do not fit the tokens "
                     f"{image_emb.shape}, {text_emb.shape}.")
  one = lambda e: jnp.broadcast_to(e.astype(image_emb.dtype), (batch, 1, width))
  tokens = jnp.concatenate([one(cls_emb), image_emb, one(sep_emb), text_emb], axis=1)
  segment_ids = jnp.concatenate([
      jnp.full((batch, 1 + n_image), SEGMENT_IMAGE, jnp.int32),
      jnp.full((batch, 1 + n_text), SEGMENT_TEXT, jnp.int32)], axis=1)
  true = jnp.ones((batch, 1), bool)
  valid = jnp.concatenate([true, image_valid.astype(bool), true, text_valid.astype(bool)], axis=1)
  return tokens, segment_ids, valid


def key_padding_mask(valid: jax.Array) -> jax.Array:
  """[batch, len] bool -> [batch, 1, 1, len]: every query attends to the valid keys only.

  Padded positions still get an output (from the valid keys) but are never read by
  another position, so what they hold changes nothing elsewhere.
  """
  return valid.astype(bool)[:, None, None, :]


class AdditiveEmbedding(nn.Module):
  """x [batch, len, width] + learned position and segment embeddings -> same shape.

  `positions` [batch, len] int default to 0..len-1; `segment_ids` [batch, len] int in
  [0, num_segments).
  """
  max_len: int
  num_segments: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
    if x.shape[1] > self.max_len:
      raise ValueError(f"Sequence of length {x.shape[1]} is longer than max_len={self.max_len}.")
    width = x.shape[-1]
    table = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, width),
                       self.param_dtype).astype(self.dtype)
    pos = table[None, :x.shape[1]] if positions is None else table[positions]
    seg = nn.Embed(self.num_segments, width, embedding_init=nn.initializers.normal(0.02),
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   name="segment_embedding")(segment_ids)
    return additive_fusion(x.astype(self.dtype), pos, seg)


class SingleStreamEmbedding(nn.Module):
  """ImageBERT's input: `[CLS] image [SEP] text`, each token + position + segment, LayerNorm.

  image_emb [batch, n_image, width], image_valid [batch, n_image], text_emb
  [batch, n_text, width], text_valid [batch, n_text] -> (x [batch, L, width], valid
  [batch, L]) with L = 2 + n_image + n_text. Position i of the sequence gets position
  embedding i: image patches keep their place, text tokens follow in order.
  """
  max_len: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_emb: jax.Array, image_valid: jax.Array, text_emb: jax.Array,
               text_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    width = image_emb.shape[-1]
    init = nn.initializers.normal(0.02)
    cls = self.param("cls", init, (width,), self.param_dtype)
    sep = self.param("sep", init, (width,), self.param_dtype)
    x, segment_ids, valid = concat_image_text(cls, image_emb.astype(self.dtype), image_valid,
                                              sep, text_emb.astype(self.dtype), text_valid)
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = AdditiveEmbedding(self.max_len, num_segments=2, name="embedding", **types)(
        x, segment_ids)
    return nn.LayerNorm(name="ln", **types)(x), valid


class PerceiverResampler(nn.Module):
  """A fixed number of learned latents cross-attend to vision hidden states (Flamingo).

  context [batch, n, context_width] (and optional context_valid [batch, n] bool) ->
  [batch, num_latents, width]; `width` defaults to context_width (else the context is
  projected to it first). Each of `depth` layers: the latents attend to the context
  and to themselves (keys and values are [context; latents]), then an MLP; pre-LN,
  residual, a final LayerNorm.
  """
  num_latents: int
  depth: int = 1
  num_heads: int = 4
  mlp_dim: int | None = None  # Default: 4 * width.
  width: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, context: jax.Array, context_valid: jax.Array | None = None) -> jax.Array:
    batch, n, context_width = context.shape
    width = self.width or context_width
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if width != context_width:
      context = nn.Dense(width, name="context_proj", **types)(context)
    latents = self.param("latents", nn.initializers.normal(0.02), (self.num_latents, width),
                         self.param_dtype)
    x = jnp.broadcast_to(latents.astype(self.dtype), (batch, self.num_latents, width))
    valid = jnp.ones((batch, n), bool) if context_valid is None else context_valid.astype(bool)
    mask = key_padding_mask(jnp.concatenate([valid, jnp.ones((batch, self.num_latents), bool)], 1))
    norm = lambda name: nn.LayerNorm(name=name, **types)
    for i in range(self.depth):
      q = norm(f"ln_latents{i}")(x)
      kv = jnp.concatenate([norm(f"ln_context{i}")(context), q], axis=1)
      x = x + attention.MultiHeadAttention(self.num_heads, name=f"attention{i}", **types)(
          q, kv, mask)
      x = x + transformer.MlpBlock(self.mlp_dim or 4 * width, name=f"mlp{i}", **types)(
          norm(f"ln_mlp{i}")(x))
    return norm("ln_final")(x)


class ModalityProjection(nn.Module):
  """[..., in_width] -> [..., out_width]: a GELU MLP from vision width to the LM's width."""
  out_width: int
  hidden_dim: int | None = None  # Default: out_width.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.gelu(nn.Dense(self.hidden_dim or self.out_width, name="fc1", **types)(x))
    return nn.Dense(self.out_width, name="fc2", **types)(x)
