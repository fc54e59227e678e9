"""LeNet-5 and SmallCNN: parameter counts, shapes, input errors, same math as flax layers."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import models


@functools.cache
def _params(model):
  """A model's initial parameters, made once per model (modules hash by their fields),
  jitted: one compilation, not one per op."""
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_lenet5_has_61706_parameters():
  params = _params(models.LeNet5())
  assert _count(params) == 61_706
  assert {k: _count(v) for k, v in params.items()} == {
      "c1": 156, "c3": 2_416, "f5": 48_120, "f6": 10_164, "output": 850}


def test_small_cnn_parameters_per_layer():
  params = _params(models.SmallCNN())
  assert [_count(params[k]) for k in ("conv1", "conv2", "conv3", "dense1", "dense2", "dense3")] == [
      260, 4_016, 9_280, 69_240, 9_680, 810]


@pytest.mark.parametrize("model", [models.LeNet5(), models.SmallCNN()])
def test_logits_shape_and_wrong_input_shape(model):
  params = _params(model)
  assert jax.jit(model.apply)({"params": params}, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)
  with pytest.raises(ValueError, match=r"\[batch, 28, 28, 1\].*\[3, 32, 32, 1\]"):
    model.apply({"params": params}, jnp.zeros((3, 32, 32, 1)))
  with pytest.raises(ValueError, match=r"\[batch, 28, 28, 1\]"):
    model.apply({"params": params}, jnp.zeros((28, 28, 1)))


class FlaxLeNet5(nn.Module):
  """The same network from flax's own layers (lax convolutions), for comparison."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(6, (5, 5), padding=2, name="c1")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = jnp.tanh(nn.Conv(16, (5, 5), padding="VALID", name="c3")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = jnp.tanh(nn.Dense(120, name="f5")(x))
    x = jnp.tanh(nn.Dense(84, name="f6")(x))
    return nn.Dense(10, name="output")(x)


def test_lenet5_computes_what_flax_layers_compute():
  params = _params(models.LeNet5())
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
  labels = jnp.arange(4)

  def loss(model, p):
    logits = model.apply({"params": p}, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  ours = jax.jit(jax.value_and_grad(lambda p: loss(models.LeNet5(), p)))(params)
  ref = jax.jit(jax.value_and_grad(lambda p: loss(FlaxLeNet5(), p)))(params)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ours[1], ref[1])
