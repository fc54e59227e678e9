"""Small pure loss functions. Shapes are in each docstring."""
import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy with integer labels.

  Args:
    logits: [batch, classes].
    labels: [batch] integer class ids.

  Returns:
    [batch] losses.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[batch, classes], [batch] -> [batch] float, 1.0 where argmax equals the label."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
