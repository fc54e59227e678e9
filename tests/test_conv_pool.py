"""conv2d and pooling against naive NumPy loops and against lax.conv_general_dilated."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import nn as mnn

RNG = np.random.default_rng(0)
# Jitted once per shape and setting: one compilation instead of many eager ops.
conv2d = jax.jit(mnn.conv2d, static_argnames=("stride", "padding", "padding_mode"))
max_pool = jax.jit(mnn.max_pool, static_argnums=(1, 2, 3))
avg_pool = jax.jit(mnn.avg_pool, static_argnums=(1, 2, 3, 4))
PADDINGS = ["VALID", "SAME", 0, 1, 2, ((1, 0), (2, 1))]


def _np_pad(x, pads, mode):
  widths = ((0, 0), *pads, (0, 0))
  return np.pad(x, widths, mode="edge") if mode == "edge" else np.pad(x, widths)


def _np_pads(padding, size, window, stride):
  if padding == "VALID":
    return ((0, 0), (0, 0))
  if padding == "SAME":  # ceil(n / s) outputs, the odd pixel at the end.
    out = []
    for n, k, s in zip(size, window, stride):
      total = max((int(np.ceil(n / s)) - 1) * s + k - n, 0)
      out.append((total // 2, total - total // 2))
    return tuple(out)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return padding


def np_conv2d(x, kernel, bias, stride, padding, mode):
  """One output pixel at a time: the definition, written out."""
  kh, kw, _, cout = kernel.shape
  xp = _np_pad(x, _np_pads(padding, x.shape[1:3], (kh, kw), (stride, stride)), mode)
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], oh, ow, cout))
  for b in range(x.shape[0]):
    for i in range(oh):
      for j in range(ow):
        patch = xp[b, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
        for o in range(cout):
          y[b, i, j, o] = np.sum(patch * kernel[..., o]) + bias[o]
  return y


def np_pool(x, window, stride, padding, reduce, pad_value):
  pads = _np_pads(padding, x.shape[1:3], (window, window), (stride, stride))
  xp = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
  oh = (xp.shape[1] - window) // stride + 1
  ow = (xp.shape[2] - window) // stride + 1
  y = np.zeros((x.shape[0], oh, ow, x.shape[3]))
  for i in range(oh):
    for j in range(ow):
      y[:, i, j, :] = reduce(xp[:, i * stride:i * stride + window,
                                j * stride:j * stride + window, :], axis=(1, 2))
  return y


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "edge"])
@pytest.mark.parametrize("size, cin, cout, k", [(7, 1, 2, 3), (8, 3, 4, 5)])
def test_conv2d_matches_numpy(padding, stride, mode, size, cin, cout, k):
  x = RNG.normal(size=(2, size, size + 1, cin)).astype(np.float32)
  kernel = RNG.normal(size=(k, k, cin, cout)).astype(np.float32)
  bias = RNG.normal(size=(cout,)).astype(np.float32)
  got = conv2d(x, kernel, bias, stride=stride, padding=padding, padding_mode=mode)
  want = np_conv2d(x, kernel, bias, stride, padding, mode)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("size", [6, 7])
def test_pooling_matches_numpy(padding, stride, window, size):
  x = RNG.normal(size=(2, size, size, 3)).astype(np.float32)
  np.testing.assert_allclose(max_pool(x, window, stride, padding),
                             np_pool(x, window, stride, padding, np.max, -np.inf), rtol=1e-6)
  np.testing.assert_allclose(avg_pool(x, window, stride, padding),
                             np_pool(x, window, stride, padding, np.mean, 0.0), rtol=1e-5, atol=1e-6)


def test_avg_pool_can_exclude_padding_from_the_count():
  x = np.ones((1, 4, 4, 1), np.float32)
  np.testing.assert_allclose(mnn.avg_pool(x, 3, 1, 1, count_include_pad=False), np.ones((1, 4, 4, 1)))
  assert float(mnn.avg_pool(x, 3, 1, 1)[0, 0, 0, 0]) == pytest.approx(4 / 9)


@pytest.mark.parametrize("padding, stride", [("VALID", 1), ("SAME", 2), (2, 1), (((1, 2), (0, 1)), 2)])
def test_conv2d_outputs_and_gradients_equal_lax_conv(padding, stride):
  x = jnp.asarray(RNG.normal(size=(3, 10, 9, 4)), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=(3, 5, 4, 6)), jnp.float32)
  pads = mnn.explicit_padding(padding, x.shape[1:3], kernel.shape[:2], (stride, stride))

  def ours(x, k):
    return mnn.conv2d(x, k, stride=stride, padding=padding)

  def reference(x, k):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  cotangent = jnp.asarray(RNG.normal(size=reference(x, kernel).shape), jnp.float32)
  def value_and_vjp(f):
    return jax.jit(lambda x, k, c: (f(x, k), jax.vjp(f, x, k)[1](c)))(x, kernel, cotangent)

  (y1, grads1), (y2, grads2) = value_and_vjp(ours), value_and_vjp(reference)
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
  for g1, g2 in zip(grads1, grads2):
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window, stride, padding", [(2, None, "VALID"), (3, 2, "SAME"), (2, 1, 1)])
def test_pool_gradients_equal_reduce_window(window, stride, padding):
  x = jnp.asarray(RNG.normal(size=(2, 7, 8, 3)), jnp.float32)
  s = window if stride is None else stride
  pads = mnn.explicit_padding(padding, x.shape[1:3], (window, window), (s, s))
  dims, strides, full = (1, window, window, 1), (1, s, s, 1), ((0, 0), *pads, (0, 0))

  def ref_avg(x):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, full) / window ** 2

  def ref_max(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, full)

  for ours, ref in [(lambda x: mnn.avg_pool(x, window, stride, padding), ref_avg),
                    (lambda x: mnn.max_pool(x, window, stride, padding), ref_max)]:
    np.testing.assert_allclose(jax.jit(ours)(x), jax.jit(ref)(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(lambda x: jnp.sum(ours(x) ** 2)))(x),
                               jax.jit(jax.grad(lambda x: jnp.sum(ref(x) ** 2)))(x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, kernel, stride, padding", [(28, 5, 1, 2), (32, 5, 1, 0), (7, 2, 2, 0),
                                                           (9, 3, 2, 1), (10, 4, 3, 2)])
def test_conv_output_size_rule(size, kernel, stride, padding):
  expected = (size - kernel + 2 * padding) // stride + 1
  assert mnn.conv_output_size(size, kernel, stride, padding) == expected
  x = jnp.zeros((1, size, size, 1))
  assert mnn.conv2d(x, jnp.zeros((kernel, kernel, 1, 1)), stride=stride,
                    padding=padding).shape[1] == expected
  assert mnn.max_pool(x, kernel, stride, padding).shape[1] == expected


def test_bad_inputs_raise_clear_errors():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="channels"):
    mnn.conv2d(x, jnp.zeros((3, 3, 2, 4)))
  with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
    mnn.conv2d(jnp.zeros((8, 8, 3)), jnp.zeros((3, 3, 3, 4)))
  with pytest.raises(ValueError, match="padding"):
    mnn.conv2d(x, jnp.zeros((3, 3, 3, 4)), padding="FULL")
  with pytest.raises(ValueError, match="padding_mode"):
    mnn.conv2d(x, jnp.zeros((3, 3, 3, 4)), padding=1, padding_mode="reflect")
  with pytest.raises(ValueError, match="larger than"):
    mnn.max_pool(x, 9)


LOWERINGS = ["shift", "band", "band1", "band2", "band3", "xla", "patches"]


def _lax_conv(x, k, stride):
  return jax.lax.conv_general_dilated(x, k, stride, "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _assert_same_values_and_gradients(ours, x, kernel, stride, tol=1e-4):
  ref = functools.partial(_lax_conv, stride=stride)
  cotangent = jnp.asarray(RNG.normal(size=ref(x, kernel).shape), jnp.float32)

  def value_and_vjp(f):
    return jax.jit(lambda x, k, c: (f(x, k), jax.vjp(f, x, k)[1](c)))(x, kernel, cotangent)

  (y1, (dx1, dk1)), (y2, (dx2, dk2)) = value_and_vjp(ours), value_and_vjp(ref)
  np.testing.assert_allclose(y1, y2, rtol=tol, atol=tol)
  np.testing.assert_allclose(dx1, dx2, rtol=tol, atol=tol, err_msg="input gradient")
  np.testing.assert_allclose(dk1, dk2, rtol=tol, atol=tol, err_msg="kernel gradient")


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("stride", [(1, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("cin, kernel_hw", [(1, (5, 5)), (3, (3, 2))])
def test_every_lowering_matches_lax_conv_with_gradients(lowering, stride, cin, kernel_hw):
  """Each lowering alone: output, input gradient and kernel gradient (its autodiff)."""
  x = jnp.asarray(RNG.normal(size=(2, 11, 12, cin)), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=(*kernel_hw, cin, 4)), jnp.float32)
  plan = mnn.conv.Plan(lowering, lowering, lowering)
  _assert_same_values_and_gradients(
      lambda x, k: mnn.conv.conv_valid(x, k, stride, plan), x, kernel, stride)


@pytest.mark.parametrize("plan", [("shift", "band", "band"), ("band", "xla", "band3"),
                                  ("xla", "band2", "patches"), ("patches", "shift", "xla"),
                                  ("shift", "xla", "xla"),
                                  # The batch in pieces (lax.map forward, lax.scan backward).
                                  ("band2", "band2", "band2", 3), ("xla", "band", "band3", 2),
                                  ("shift", "patches", "band", 6)])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_mixed_plans_match_lax_conv_with_gradients(plan, stride):
  """Forward, input gradient and kernel gradient by different lowerings (custom VJP),
  and the batch of 6 in 2, 3 or 6 pieces."""
  x = jnp.asarray(RNG.normal(size=(6, 10, 9, 2)), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=(3, 4, 2, 5)), jnp.float32)
  plan = mnn.conv.Plan(*plan)
  _assert_same_values_and_gradients(
      lambda x, k: mnn.conv.conv_valid(x, k, stride, plan), x, kernel, stride)


def test_batch_pieces_that_do_not_divide_the_batch():
  """5 images in 2 pieces: padded with a zero image, which changes no gradient."""
  x = jnp.asarray(RNG.normal(size=(5, 9, 8, 3)), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=(3, 3, 3, 4)), jnp.float32)
  plan = mnn.conv.Plan("band", "band2", "band", 2)
  _assert_same_values_and_gradients(
      lambda x, k: mnn.conv.conv_valid(x, k, (1, 1), plan), x, kernel, (1, 1))


@pytest.mark.parametrize("x_shape, kernel_shape, stride", [
    ((512, 32, 32, 1), (5, 5, 1, 6), (1, 1)),     # LeNet C1 at batch 512: 4 pieces.
    ((128, 18, 18, 10), (5, 5, 10, 16), (1, 1)),  # SmallCNN conv2: XLA forward, 2 pieces.
    ((7, 9, 9, 16), (3, 3, 16, 64), (1, 1)),      # SmallCNN conv3: band1 (im2col).
    ((5, 9, 9, 16), (1, 1, 16, 8), (1, 1)),       # 1x1.
    ((6, 33, 33, 4), (3, 3, 4, 8), (2, 2)),       # Strided.
    ((1, 130, 130, 16), (3, 3, 16, 16), (1, 1)),  # One image's rows too big: XLA.
])
def test_chosen_plans_match_lax_conv_with_gradients(x_shape, kernel_shape, stride):
  """Whatever `choose_plan` picks (batch in pieces too)."""
  x = jnp.asarray(RNG.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=kernel_shape), jnp.float32)
  plan = mnn.conv.choose_plan(x.shape, kernel.shape, stride)
  assert x_shape[0] < 512 or plan.batch_chunks > 1
  _assert_same_values_and_gradients(
      lambda x, k: mnn.conv.conv_valid(x, k, stride, plan), x, kernel, stride, tol=2e-3)


@pytest.mark.parametrize("plan", [("band", "band", "band"), ("xla", "band2", "band"),
                                  ("band2", "band2", "band2", 2), ("band", "band", "band", 3)])
def test_bias_gradient_in_every_path(plan):
  """The bias is added inside the custom VJP (and its gradient summed piece by piece)."""
  x = jnp.asarray(RNG.normal(size=(6, 8, 9, 3)), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=(3, 3, 3, 4)), jnp.float32)
  bias = jnp.asarray(RNG.normal(size=(4,)), jnp.float32)
  plan = mnn.conv.Plan(*plan)

  def ours(x, k, b):
    return mnn.conv.conv_valid(x, k, (1, 1), plan, b)

  def reference(x, k, b):
    return _lax_conv(x, k, (1, 1)) + b

  cotangent = jnp.asarray(RNG.normal(size=reference(x, kernel, bias).shape), jnp.float32)
  for got, want in zip(jax.vjp(ours, x, kernel, bias)[1](cotangent),
                       jax.vjp(reference, x, kernel, bias)[1](cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
