"""Plain-Flax twins of the MNIST models, for throughput comparisons only.

The same layers as `mmjax.models.LeNet5` and `mmjax.models.SmallCNN` (same parameter
names and shapes), but built from `flax.linen.Conv` (XLA's convolution) and
`flax.linen.avg_pool` / `flax.linen.max_pool` (XLA's reduce-window) instead of
`mmjax.nn`. `train_throughput.py --model small_cnn_flax` swaps one in for the
task's model, so the same trainer step is timed.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


class PlainLeNet5(nn.Module):
  """LeNet-5 as `mmjax.models.LeNet5`, with nn.Conv and nn.avg_pool."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.tanh(nn.Conv(6, (5, 5), padding=2, name="c1")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.tanh(nn.Conv(16, (5, 5), padding="VALID", name="c3")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = jnp.tanh(nn.Dense(120, name="f5")(x))
    x = jnp.tanh(nn.Dense(84, name="f6")(x))
    return nn.Dense(self.num_classes, name="output")(x)


class PlainSmallCNN(nn.Module):
  """SmallCNN as `mmjax.models.SmallCNN`, with nn.Conv and nn.max_pool."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, (features, size) in enumerate([(10, 5), (16, 5), (64, 3)]):
      x = nn.relu(nn.Conv(features, (size, size), padding="SAME", name=f"conv{i + 1}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120, name="dense1")(x))
    x = nn.relu(nn.Dense(80, name="dense2")(x))
    return nn.Dense(self.num_classes, name="dense3")(x)


MODELS = {"lenet5_flax": ("lenet5", PlainLeNet5), "small_cnn_flax": ("small_cnn", PlainSmallCNN)}
