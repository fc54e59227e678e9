"""Causal text Transformer encoder, pooled at the EOS token as in CLIP."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data import tokenizer
from mmjax.nn import transformer


class TextTransformer(nn.Module):
  """int tokens [batch, len] -> float32 [batch, width], the final state at the first EOS.

  With `return_sequence=True`, every position's final state [batch, len, width]: the
  text context that a diffusion U-Net cross-attends to.

  `pool="argmax"` reads the state at the highest token id instead (OpenAI's CLIP, whose
  end-of-text token has the highest id); with `activation="quick_gelu"` or "gelu_exact"
  and `layernorm_epsilon=1e-5` this is open_clip's TextTransformer. `eos_id` is the id
  that pool="eos" looks for (default tokenizer.EOS; Hugging Face CLIP's config gives its
  own). `pool="last"` reads the last position, with `causal=False` SigLIP's text tower.

  `dtype`, `param_dtype`, `dropout_rate`, `remat` and `scan_layers` as in vit.ViT (the
  scanned parameters are "encoder/blocks/..." with a leading [depth] axis).
  """
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  vocab_size: int = tokenizer.VOCAB_SIZE
  max_len: int = 32
  pool: str = "eos"  # "eos": the first `eos_id`; "argmax": the highest id; "last".
  eos_id: int | None = None  # None: tokenizer.EOS.
  causal: bool = True
  activation: str = "gelu"  # The MLPs' nonlinearity: see transformer.ACTIVATIONS.
  layernorm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  remat: str = "none"  # "none", "full" or a jax.checkpoint_policies name.
  scan_layers: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, return_sequence: bool = False,
               deterministic: bool = True) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"TextTransformer expects tokens [batch, len <= {self.max_len}], "
                       f"got {list(tokens.shape)}.")
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.width, name="token_embedding", **types)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.01), (self.max_len, self.width),
                     self.param_dtype)
    x = x + pos[:tokens.shape[1]].astype(self.dtype)
    if self.pool not in ("eos", "argmax", "last"):
      raise ValueError(f"TextTransformer: pool={self.pool!r}: use 'eos', 'argmax' or 'last'.")
    encoder = transformer.Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation,
                                  self.layernorm_epsilon, self.dropout_rate, causal=self.causal,
                                  remat=self.remat, scan_layers=self.scan_layers,
                                  name="encoder", **types)
    x = encoder(x, deterministic=deterministic)
    if return_sequence:
      return x.astype(jnp.float32)
    if self.pool == "last":
      return x[:, -1].astype(jnp.float32)
    if self.pool == "argmax":
      eos = jnp.argmax(tokens, axis=1)
    else:  # The first EOS; causal, so PAD after it is unseen.
      eos_id = tokenizer.EOS if self.eos_id is None else self.eos_id
      eos = jnp.argmax(tokens == eos_id, axis=1)
    return x[jnp.arange(x.shape[0]), eos].astype(jnp.float32)
