"""Causal text Transformer encoder, pooled at the EOS token as in CLIP."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data import tokenizer
from mmjax.nn import attention
from mmjax.nn import transformer


class TextTransformer(nn.Module):
  """int tokens [batch, len] -> [batch, width], the final state at the first EOS.

  With `return_sequence=True`, every position's final state [batch, len, width]: the
  text context that a diffusion U-Net cross-attends to.
  """
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  vocab_size: int = tokenizer.VOCAB_SIZE
  max_len: int = 32

  @nn.compact
  def __call__(self, tokens: jax.Array, return_sequence: bool = False) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"TextTransformer expects tokens [batch, len <= {self.max_len}], "
                       f"got {list(tokens.shape)}.")
    x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.01), (self.max_len, self.width))
    x = x + pos[:tokens.shape[1]]
    x = transformer.Encoder(self.depth, self.num_heads, self.mlp_dim, name="encoder")(
        x, attention.causal_mask(tokens.shape[1]))
    if return_sequence:
      return x
    eos = jnp.argmax(tokens == tokenizer.EOS, axis=1)  # First EOS; causal, so PAD after it is unseen.
    return x[jnp.arange(x.shape[0]), eos]
