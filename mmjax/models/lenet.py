"""LeNet-5 (LeCun et al., 1998) as in the classic diagram, for 28x28 MNIST digits."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import nn as mnn
from mmjax.models.common import check_image_shape


class LeNet5(nn.Module):
  """[batch, 28, 28, 1] -> float32 logits [batch, num_classes]; 61,706 parameters for 10 classes.

  The image is zero-padded to 32x32; C1 6@5x5 -> 28x28, 2x2 average pooling -> 14x14,
  C3 16@5x5 -> 10x10, 2x2 average pooling -> 5x5, then fully connected 120, 84 and
  the output layer; tanh after every hidden layer.

  `dtype` is the computation dtype of every layer, `param_dtype` the parameters' (see
  mmjax.nn.precision); average pooling sums in float32. The logits are float32.
  """
  num_classes: int = 10
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_shape(x, (28, 28, 1), "LeNet5")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda n, name: nn.Dense(n, **kw, name=name)
    x = jnp.tanh(mnn.Conv2D(6, 5, padding=2, **kw, name="c1")(x))
    x = mnn.avg_pool(x, 2)
    x = jnp.tanh(mnn.Conv2D(16, 5, **kw, name="c3")(x))
    x = mnn.avg_pool(x, 2)
    x = x.reshape(x.shape[0], -1)  # [batch, 5 * 5 * 16 = 400]
    x = jnp.tanh(dense(120, "f5")(x))
    x = jnp.tanh(dense(84, "f6")(x))
    return dense(self.num_classes, "output")(x).astype(jnp.float32)
