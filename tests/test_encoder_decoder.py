"""Cross-attention learns: a 2-layer encoder-decoder Transformer learns to reverse digit strings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.nn import attention
from mmjax.nn import transformer

LENGTH, VOCAB, BOS = 6, 10, 10  # Digits 0-9, and a start token for the decoder.


class Reverser(nn.Module):
  """Encoder over the digits; the decoder reads them only through cross-attention."""
  width: int = 64

  @nn.compact
  def __call__(self, source, target_in):
    embed = nn.Embed(VOCAB + 1, self.width)
    pos = self.param("pos", nn.initializers.normal(0.1), (LENGTH, self.width))
    memory = transformer.Encoder(2, 4, 128, name="encoder")(embed(source) + pos)
    x = embed(target_in) + pos
    for i in range(2):
      x = transformer.DecoderBlock(4, 128, name=f"decoder{i}")(
          x, memory, self_mask=attention.causal_mask(LENGTH))
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def _batch(rng, n):
  source = rng.integers(0, VOCAB, (n, LENGTH))
  target = source[:, ::-1]
  target_in = np.concatenate([np.full((n, 1), BOS), target[:, :-1]], axis=1)
  return source, target_in, target


@pytest.mark.slow  # A training run of a few hundred steps.
def test_encoder_decoder_learns_to_reverse_digit_strings():
  rng = np.random.default_rng(0)
  model = Reverser()
  params = model.init(jax.random.PRNGKey(0), *_batch(rng, 2)[:2])
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, source, target_in, target):
    def loss_fn(p):
      logits = model.apply(p, source, target_in)
      return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(400):
    params, opt_state, loss = step(params, opt_state, *_batch(rng, 64))

  @jax.jit
  def greedy(params, source):
    decoder_in = jnp.full((source.shape[0], LENGTH), BOS)
    digits = []
    for i in range(LENGTH):  # One digit at a time, fed back as the next decoder input.
      digit = jnp.argmax(model.apply(params, source, decoder_in)[:, i], axis=-1)
      digits.append(digit)
      if i + 1 < LENGTH:
        decoder_in = decoder_in.at[:, i + 1].set(digit)
    return jnp.stack(digits, axis=1)

  source, _, target = _batch(np.random.default_rng(1), 500)  # Held-out strings.
  exact = np.mean(np.all(np.asarray(greedy(params, source)) == target, axis=1))
  assert exact == 1.0, f"exact match {exact:.3f}, final loss {float(loss):.4f}"
