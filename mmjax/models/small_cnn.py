"""The small Keras CNN of the CNN tutorial, for 28x28 grayscale images."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import nn as mnn
from mmjax.models.common import check_image_shape


class SmallCNN(nn.Module):
  """[batch, 28, 28, 1] -> float32 logits [batch, num_classes].

  conv 10@5x5 same, 2x2 max pool, conv 16@5x5 same, 2x2 max pool, conv 64@3x3 same,
  2x2 max pool (28 -> 14 -> 7 -> 3), flatten (576), dense 120, dense 80, dense 10;
  ReLU after every hidden layer. Parameters per layer: 260, 4,016, 9,280, 69,240,
  9,680, 810.

  `dtype` and `param_dtype` as in LeNet5: every layer computes in `dtype`; the logits
  are float32.
  """
  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_shape(x, (28, 28, 1), "SmallCNN")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i, (features, size) in enumerate([(10, 5), (16, 5), (64, 3)]):
      x = nn.relu(mnn.Conv2D(features, size, padding="SAME", **kw, name=f"conv{i + 1}")(x))
      x = mnn.max_pool(x, 2)
    x = x.reshape(x.shape[0], -1)  # [batch, 3 * 3 * 64 = 576]
    dense = lambda n, name: nn.Dense(n, **kw, name=name)
    x = nn.relu(dense(120, "dense1")(x))
    x = nn.relu(dense(80, "dense2")(x))
    return dense(self.num_classes, "dense3")(x).astype(jnp.float32)
