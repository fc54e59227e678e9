"""The small Keras CNN of the CNN tutorial, for 28x28 grayscale images."""
import flax.linen as nn
import jax

from mmjax import nn as mnn
from mmjax.models.common import check_image_shape


class SmallCNN(nn.Module):
  """[batch, 28, 28, 1] -> logits [batch, num_classes].

  conv 10@5x5 same, 2x2 max pool, conv 16@5x5 same, 2x2 max pool, conv 64@3x3 same,
  2x2 max pool (28 -> 14 -> 7 -> 3), flatten (576), dense 120, dense 80, dense 10;
  ReLU after every hidden layer. Parameters per layer: 260, 4,016, 9,280, 69,240,
  9,680, 810.
  """
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_shape(x, (28, 28, 1), "SmallCNN")
    for i, (features, size) in enumerate([(10, 5), (16, 5), (64, 3)]):
      x = nn.relu(mnn.Conv2D(features, size, padding="SAME", name=f"conv{i + 1}")(x))
      x = mnn.max_pool(x, 2)
    x = x.reshape(x.shape[0], -1)  # [batch, 3 * 3 * 64 = 576]
    x = nn.relu(nn.Dense(120, name="dense1")(x))
    x = nn.relu(nn.Dense(80, name="dense2")(x))
    return nn.Dense(self.num_classes, name="dense3")(x)
