"""Bad shapes and static arguments raise a ValueError naming the function; NumPy integers
work wherever Python ints do; traced values are never checked (nothing at run time)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import nn as mnn

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
KERNEL = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4)), jnp.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stride=0), "conv2d: stride must be an integer >= 1, got 0"),  # Was ZeroDivisionError.
    (dict(stride=(1, 0)), "conv2d: stride"),
    (dict(stride=-2), "conv2d: stride"),
    (dict(stride=1.5), "conv2d: stride"),
    (dict(stride=True), "conv2d: stride"),
    (dict(stride=(1, 2, 3)), "conv2d: stride"),
    (dict(padding=-1), "conv2d: padding must be an integer >= 0"),
    (dict(padding=1.0), "conv2d: padding"),
    (dict(padding=((1, 0), (0, -1))), "conv2d: padding"),
    (dict(padding=(1, 2)), "conv2d: padding"),
    (dict(padding="FULL"), "conv2d: padding"),
    (dict(padding=1, padding_mode="reflect"), "conv2d: padding_mode"),
])
def test_conv2d_static_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mnn.conv2d(X, KERNEL, **kwargs)


@pytest.mark.parametrize("args, match", [
    ((X, KERNEL, jnp.zeros(1)), r"conv2d: bias must be \[out_channels\] = \(4,\), got shape \(1,\)"),
    ((X, KERNEL, jnp.zeros((1, 4))), "conv2d: bias"),
    ((X[0], KERNEL), r"conv2d: x must be \[batch, height, width, channels\]"),
    ((X, KERNEL[0]), "conv2d: kernel must be"),
    ((X, KERNEL[:, :, :2]), "conv2d: x has 3 channels but the kernel expects 2"),
    ((X, jnp.zeros((0, 3, 3, 4))), "conv2d: the kernel's window"),
    ((X, jnp.zeros((9, 9, 3, 4))), "conv2d: the kernel window .* is larger than"),
])
def test_conv2d_shapes(args, match):
  with pytest.raises(ValueError, match=match):
    mnn.conv2d(*args)


def test_numpy_integers_work_like_python_ints():
  """Were TypeError: 'numpy.int64' object is not iterable."""
  for stride, padding in [(2, 1), (1, ((1, 0), (2, 1)))]:
    expected = mnn.conv2d(X, KERNEL, stride=stride, padding=padding)
    np_stride = np.int64(stride)
    np_padding = np.int64(padding) if isinstance(padding, int) else np.array(padding)
    np.testing.assert_array_equal(mnn.conv2d(X, KERNEL, stride=np_stride, padding=np_padding),
                                  expected)
    np.testing.assert_array_equal(
        mnn.conv2d(X, KERNEL, stride=(np.int32(stride), np.int16(stride)), padding=padding),
        expected)
  for pool in (mnn.max_pool, mnn.avg_pool):
    np.testing.assert_array_equal(pool(X, np.int64(3), np.int64(2), np.int64(1)),
                                  pool(X, 3, 2, 1))
  model = mnn.Conv2D(4, np.int64(3), stride=np.int64(2), padding=np.int64(1))
  params = model.init(jax.random.key(0), X)
  assert model.apply(params, X).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("pool", ["max_pool", "avg_pool"])
@pytest.mark.parametrize("args, match", [
    ((0,), "window must be an integer >= 1, got 0"),
    ((2, 0), "stride must be an integer >= 1, got 0"),
    ((2, (2, 0)), "stride"),
    ((2.0,), "window"),
    ((2, 2, -1), "padding must be an integer >= 0"),
    ((2, 2, "FULL"), "padding"),
    ((9,), r"window \(9, 9\) is larger than the padded input"),
])
def test_pool_arguments(pool, args, match):
  with pytest.raises(ValueError, match=f"{pool}: {match}"):
    getattr(mnn, pool)(X, *args)


@pytest.mark.parametrize("pool", ["max_pool", "avg_pool"])
def test_pool_shape(pool):
  with pytest.raises(ValueError, match=rf"{pool}: x must be \[batch, height, width, channels\]"):
    getattr(mnn, pool)(X[0], 2)


def test_conv2d_module_kernel_size():
  with pytest.raises(ValueError, match="Conv2D: kernel_size must be an integer >= 1"):
    mnn.Conv2D(4, 0).init(jax.random.key(0), X)


def test_checks_are_static_so_jit_traces_through_them():
  """Every check reads shapes and static arguments only: jitted, they cost nothing."""
  conv = jax.jit(mnn.conv2d, static_argnames=("stride", "padding"))
  assert conv(X, KERNEL, jnp.zeros(4), stride=np.int64(2), padding=np.int64(1)).shape == (2, 4, 4, 4)
  with pytest.raises(ValueError, match="conv2d: bias"):
    conv(X, KERNEL, jnp.zeros(1))
