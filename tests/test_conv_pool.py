"""conv2d and pooling against naive NumPy loops and against lax.conv_general_dilated."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmjax import nn as mnn

RNG = np.random.default_rng(0)
# Jitted once per shape and setting: one compilation instead of many eager ops. These
# small programs compile in about half the time without LLVM's optimizations, and
# compiling is most of this file's time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
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


def _run_all(cases):
  """One jitted program for many cases: `cases` maps a key to (function, arguments); returns
  a dict of each key's outputs as NumPy arrays. Compiling one program of all of a test's
  cases costs less than half of compiling them one by one (the per-program overhead), and
  each case is still computed, and asserted, on its own."""
  keys = list(cases)
  fns = [cases[k][0] for k in keys]
  args = [cases[k][1] for k in keys]
  out = jit(lambda args: [f(*a) for f, a in zip(fns, args)])(args)
  return dict(zip(keys, jax.device_get(out)))


def _case_rng(*key):
  """A generator seeded by a case's parameters (the same inputs however cases are run)."""
  return np.random.default_rng([ord(c) for c in repr(key)])


CONV2D_SIZES = [(7, 1, 2, 3), (8, 3, 4, 5)]


@functools.cache
def _conv2d_cases():
  """Every test_conv2d_matches_numpy case: inputs and conv2d's output, in one program."""
  inputs, cases = {}, {}
  for padding in PADDINGS:
    for stride in [1, 2]:
      for mode in ["zeros", "edge"]:
        for size, cin, cout, k in CONV2D_SIZES:
          key = (padding, stride, mode, size, cin, cout, k)
          rng = _case_rng(*key)
          x = rng.normal(size=(2, size, size + 1, cin)).astype(np.float32)
          kernel = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
          bias = rng.normal(size=(cout,)).astype(np.float32)
          inputs[key] = (x, kernel, bias)
          cases[key] = (functools.partial(mnn.conv2d, stride=stride, padding=padding,
                                          padding_mode=mode), (x, kernel, bias))
  return inputs, _run_all(cases)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["zeros", "edge"])
@pytest.mark.parametrize("size, cin, cout, k", CONV2D_SIZES)
def test_conv2d_matches_numpy(padding, stride, mode, size, cin, cout, k):
  inputs, outputs = _conv2d_cases()
  key = (padding, stride, mode, size, cin, cout, k)
  x, kernel, bias = inputs[key]
  got = outputs[key]
  want = np_conv2d(x, kernel, bias, stride, padding, mode)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@functools.cache
def _pooling_cases():
  """Every test_pooling_matches_numpy case: inputs, max and average pools, in one program."""
  inputs, cases = {}, {}
  for padding in PADDINGS:
    for stride in [1, 2]:
      for window in [2, 3]:
        for size in [6, 7]:
          key = (padding, stride, window, size)
          x = _case_rng(*key).normal(size=(2, size, size, 3)).astype(np.float32)
          inputs[key] = x
          cases[key] = (lambda x, w=window, s=stride, p=padding: (mnn.max_pool(x, w, s, p),
                                                                  mnn.avg_pool(x, w, s, p)),
                        (x,))
  return inputs, _run_all(cases)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("size", [6, 7])
def test_pooling_matches_numpy(padding, stride, window, size):
  inputs, outputs = _pooling_cases()
  key = (padding, stride, window, size)
  x, (got_max, got_avg) = inputs[key], outputs[key]
  want_max = np_pool(x, window, stride, padding, np.max, -np.inf)
  want_avg = np_pool(x, window, stride, padding, np.mean, 0.0)
  assert got_max.shape == want_max.shape and got_avg.shape == want_avg.shape
  np.testing.assert_allclose(got_max, want_max, rtol=1e-6)
  np.testing.assert_allclose(got_avg, want_avg, rtol=1e-5, atol=1e-6)


def test_avg_pool_can_exclude_padding_from_the_count():
  x = np.ones((1, 4, 4, 1), np.float32)
  np.testing.assert_allclose(mnn.avg_pool(x, 3, 1, 1, count_include_pad=False), np.ones((1, 4, 4, 1)))
  assert float(mnn.avg_pool(x, 3, 1, 1)[0, 0, 0, 0]) == pytest.approx(4 / 9)


OUTPUT_AND_GRADIENT_CASES = [("VALID", 1), ("SAME", 2), (2, 1), (((1, 2), (0, 1)), 2)]


def _value_and_vjp(f, x, k, c):
  return f(x, k), jax.vjp(f, x, k)[1](c)


@functools.cache
def _conv2d_vs_lax_cases():
  """Every test_conv2d_outputs_and_gradients_equal_lax_conv case, in one program."""
  cases = {}
  for padding, stride in OUTPUT_AND_GRADIENT_CASES:
    rng = _case_rng(padding, stride)
    x = jnp.asarray(rng.normal(size=(3, 10, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 5, 4, 6)), jnp.float32)
    pads = mnn.explicit_padding(padding, x.shape[1:3], kernel.shape[:2], (stride, stride))

    def ours(x, k, stride=stride, padding=padding):
      return mnn.conv2d(x, k, stride=stride, padding=padding)

    def reference(x, k, stride=stride, pads=pads):
      return jax.lax.conv_general_dilated(x, k, (stride, stride), pads,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out_shape = jax.eval_shape(reference, x, kernel).shape
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    cases[(padding, stride)] = (
        lambda x, k, c, ours=ours, reference=reference: (_value_and_vjp(ours, x, k, c),
                                                         _value_and_vjp(reference, x, k, c)),
        (x, kernel, cotangent))
  return _run_all(cases)


@pytest.mark.parametrize("padding, stride", OUTPUT_AND_GRADIENT_CASES)
def test_conv2d_outputs_and_gradients_equal_lax_conv(padding, stride):
  (y1, grads1), (y2, grads2) = _conv2d_vs_lax_cases()[(padding, stride)]
  assert y1.shape == y2.shape
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
  for g1, g2 in zip(grads1, grads2, strict=True):
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4)


POOL_GRADIENT_CASES = [(2, None, "VALID"), (3, 2, "SAME"), (2, 1, 1)]


@functools.cache
def _pool_gradient_cases():
  """Every test_pool_gradients_equal_reduce_window case (average and max pool, outputs and
  gradients, ours and reduce_window's), in one program."""
  cases = {}
  for window, stride, padding in POOL_GRADIENT_CASES:
    x = jnp.asarray(_case_rng(window, stride, padding).normal(size=(2, 7, 8, 3)), jnp.float32)
    s = window if stride is None else stride
    pads = mnn.explicit_padding(padding, x.shape[1:3], (window, window), (s, s))
    dims, strides, full = (1, window, window, 1), (1, s, s, 1), ((0, 0), *pads, (0, 0))

    def ref_avg(x, dims=dims, strides=strides, full=full, window=window):
      return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, full) / window ** 2

    def ref_max(x, dims=dims, strides=strides, full=full):
      return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, full)

    pairs = [(lambda x, w=window, s=stride, p=padding: mnn.avg_pool(x, w, s, p), ref_avg),
             (lambda x, w=window, s=stride, p=padding: mnn.max_pool(x, w, s, p), ref_max)]

    def run(x, pairs=pairs):
      return [((ours(x), ref(x)),
               (jax.grad(lambda x: jnp.sum(ours(x) ** 2))(x),
                jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x))) for ours, ref in pairs]

    cases[(window, stride, padding)] = (run, (x,))
  return _run_all(cases)


@pytest.mark.parametrize("window, stride, padding", POOL_GRADIENT_CASES)
def test_pool_gradients_equal_reduce_window(window, stride, padding):
  for (ours, ref), (grad_ours, grad_ref) in _pool_gradient_cases()[(window, stride, padding)]:
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_ours, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, kernel, stride, padding", [(28, 5, 1, 2), (32, 5, 1, 0), (7, 2, 2, 0),
                                                           (9, 3, 2, 1), (10, 4, 3, 2)])
def test_conv_output_size_rule(size, kernel, stride, padding):
  expected = (size - kernel + 2 * padding) // stride + 1
  assert mnn.conv_output_size(size, kernel, stride, padding) == expected
  x = jnp.zeros((1, size, size, 1))
  assert jax.eval_shape(lambda x: mnn.conv2d(x, jnp.zeros((kernel, kernel, 1, 1)), stride=stride,
                                             padding=padding), x).shape[1] == expected
  assert jax.eval_shape(lambda x: mnn.max_pool(x, kernel, stride, padding), x).shape[1] == expected


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


def _vjp_case(ours, x, kernel, stride, rng):
  """(function, arguments) for _run_all: outputs, input and kernel gradients of `ours` and
  of lax's convolution, under one random cotangent."""
  ref = functools.partial(_lax_conv, stride=stride)
  out_shape = jax.eval_shape(ref, x, kernel).shape
  cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  return (lambda x, k, c: (_value_and_vjp(ours, x, k, c), _value_and_vjp(ref, x, k, c)),
          (x, kernel, cotangent))


def _assert_same_values_and_gradients(result, tol=1e-4):
  (y1, (dx1, dk1)), (y2, (dx2, dk2)) = result
  assert y1.shape == y2.shape
  np.testing.assert_allclose(y1, y2, rtol=tol, atol=tol)
  np.testing.assert_allclose(dx1, dx2, rtol=tol, atol=tol, err_msg="input gradient")
  np.testing.assert_allclose(dk1, dk2, rtol=tol, atol=tol, err_msg="kernel gradient")


LOWERING_STRIDES = [(1, 1), (2, 1), (2, 3)]
LOWERING_SHAPES = [(1, (5, 5)), (3, (3, 2))]


@functools.cache
def _every_lowering_cases():
  """Every test_every_lowering_matches_lax_conv_with_gradients case, in one program."""
  cases = {}
  for lowering in LOWERINGS:
    for stride in LOWERING_STRIDES:
      for cin, kernel_hw in LOWERING_SHAPES:
        rng = _case_rng(lowering, stride, cin, kernel_hw)
        x = jnp.asarray(rng.normal(size=(2, 11, 12, cin)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(*kernel_hw, cin, 4)), jnp.float32)
        plan = mnn.conv_cpu.Plan(lowering, lowering, lowering)
        cases[(lowering, stride, cin, kernel_hw)] = _vjp_case(
            lambda x, k, stride=stride, plan=plan: mnn.conv_cpu.conv_valid(x, k, stride, plan),
            x, kernel, stride, rng)
  return _run_all(cases)


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("stride", LOWERING_STRIDES)
@pytest.mark.parametrize("cin, kernel_hw", LOWERING_SHAPES)
def test_every_lowering_matches_lax_conv_with_gradients(lowering, stride, cin, kernel_hw):
  """Each lowering alone: output, input gradient and kernel gradient (its autodiff)."""
  _assert_same_values_and_gradients(_every_lowering_cases()[(lowering, stride, cin, kernel_hw)])


MIXED_PLANS = [("shift", "band", "band"), ("band", "xla", "band3"),
               ("xla", "band2", "patches"), ("patches", "shift", "xla"),
               ("shift", "xla", "xla"),
               # The batch in pieces (lax.map forward, lax.scan backward).
               ("band2", "band2", "band2", 3), ("xla", "band", "band3", 2),
               ("shift", "patches", "band", 6)]
MIXED_STRIDES = [(1, 1), (2, 2)]


@functools.cache
def _mixed_plan_cases():
  """Every test_mixed_plans_match_lax_conv_with_gradients case, and
  test_batch_pieces_that_do_not_divide_the_batch's, in one program."""
  cases = {}
  for plan in MIXED_PLANS:
    for stride in MIXED_STRIDES:
      rng = _case_rng(plan, stride)
      x = jnp.asarray(rng.normal(size=(6, 10, 9, 2)), jnp.float32)
      kernel = jnp.asarray(rng.normal(size=(3, 4, 2, 5)), jnp.float32)
      cases[(plan, stride)] = _vjp_case(
          lambda x, k, stride=stride, plan=mnn.conv_cpu.Plan(*plan): mnn.conv_cpu.conv_valid(
              x, k, stride, plan), x, kernel, stride, rng)
  # 5 images in 2 pieces.
  rng = _case_rng("pieces")
  x = jnp.asarray(rng.normal(size=(5, 9, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  plan = mnn.conv_cpu.Plan("band", "band2", "band", 2)
  cases["pieces"] = _vjp_case(lambda x, k: mnn.conv_cpu.conv_valid(x, k, (1, 1), plan),
                              x, kernel, (1, 1), rng)
  return _run_all(cases)


@pytest.mark.parametrize("plan", MIXED_PLANS)
@pytest.mark.parametrize("stride", MIXED_STRIDES)
def test_mixed_plans_match_lax_conv_with_gradients(plan, stride):
  """Forward, input gradient and kernel gradient by different lowerings (custom JVP),
  and the batch of 6 in 2, 3 or 6 pieces."""
  _assert_same_values_and_gradients(_mixed_plan_cases()[(plan, stride)])


def test_batch_pieces_that_do_not_divide_the_batch():
  """5 images in 2 pieces: padded with a zero image, which changes no gradient."""
  _assert_same_values_and_gradients(_mixed_plan_cases()["pieces"])


CHOSEN_PLAN_CASES = [
    ((512, 32, 32, 1), (5, 5, 1, 6), (1, 1)),     # LeNet C1 at batch 512: 4 pieces.
    ((128, 18, 18, 10), (5, 5, 10, 16), (1, 1)),  # SmallCNN conv2: XLA forward, 2 pieces.
    ((7, 9, 9, 16), (3, 3, 16, 64), (1, 1)),      # SmallCNN conv3: band1 (im2col).
    ((5, 9, 9, 16), (1, 1, 16, 8), (1, 1)),       # 1x1.
    ((6, 33, 33, 4), (3, 3, 4, 8), (2, 2)),       # Strided.
    ((1, 130, 130, 16), (3, 3, 16, 16), (1, 1)),  # One image's rows too big: XLA.
]


@functools.cache
def _chosen_plan_cases():
  """Every test_chosen_plans_match_lax_conv_with_gradients case: its plan, and its outputs
  and gradients (all cases in one program)."""
  plans, cases = {}, {}
  for x_shape, kernel_shape, stride in CHOSEN_PLAN_CASES:
    key = (x_shape, kernel_shape, stride)
    rng = _case_rng(*key)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    plans[key] = plan = mnn.conv_cpu.choose_plan(x.shape, kernel.shape, stride)
    cases[key] = _vjp_case(
        lambda x, k, stride=stride, plan=plan: mnn.conv_cpu.conv_valid(x, k, stride, plan),
        x, kernel, stride, rng)
  return plans, _run_all(cases)


@pytest.mark.parametrize("x_shape, kernel_shape, stride", CHOSEN_PLAN_CASES)
def test_chosen_plans_match_lax_conv_with_gradients(x_shape, kernel_shape, stride):
  """Whatever `choose_plan` picks (batch in pieces too)."""
  plans, results = _chosen_plan_cases()
  key = (x_shape, kernel_shape, stride)
  assert x_shape[0] < 512 or plans[key].batch_chunks > 1
  _assert_same_values_and_gradients(results[key], tol=2e-3)


BIAS_PLANS = [("band", "band", "band"), ("xla", "band2", "band"),
              ("band2", "band2", "band2", 2), ("band", "band", "band", 3)]


@functools.cache
def _bias_gradient_cases():
  """Every test_bias_gradient_in_every_path case, in one program."""
  cases = {}
  for plan in BIAS_PLANS:
    rng = _case_rng(plan)
    x = jnp.asarray(rng.normal(size=(6, 8, 9, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(4,)), jnp.float32)

    def ours(x, k, b, plan=mnn.conv_cpu.Plan(*plan)):
      return mnn.conv_cpu.conv_valid(x, k, (1, 1), plan, b)

    def reference(x, k, b):
      return _lax_conv(x, k, (1, 1)) + b

    out_shape = jax.eval_shape(reference, x, kernel, bias).shape
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    cases[plan] = (lambda x, k, b, c, ours=ours, reference=reference: (
        jax.vjp(ours, x, k, b)[1](c), jax.vjp(reference, x, k, b)[1](c)),
                   (x, kernel, bias, cotangent))
  return _run_all(cases)


@pytest.mark.parametrize("plan", BIAS_PLANS)
def test_bias_gradient_in_every_path(plan):
  """The bias is added inside the custom JVP (and its gradient summed piece by piece)."""
  got, want = _bias_gradient_cases()[plan]
  for got, want in zip(got, want, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# Fuzzing conv2d against lax.conv_general_dilated: a seeded sample of small shapes,
# strides, paddings, dtypes and lowerings; one jitted program for all cases (outputs, VJPs
# and JVPs of both), so the sample stays a few seconds.
FUZZ_LOWERINGS = ["shift", "band", "band1", "band2", "band3", "xla", "patches"]
# (x dtype, kernel and bias dtype, tolerance relative to the largest reference value).
FUZZ_DTYPES = {"f32": (jnp.float32, jnp.float32, 1e-4),
               "bf16-f32": (jnp.bfloat16, jnp.float32, 1e-2),  # Computed in float32.
               "bf16": (jnp.bfloat16, jnp.bfloat16, 5e-2)}


def _fuzz_cases(n: int = 20, seed: int = 15) -> list:
  """`n` seeded cases: 8 "auto", 8 forced plans (the batch in 1 to 3 pieces, padded where
  they do not divide it), 4 "xla"; float32, bfloat16 x with float32 kernel, and (3
  cases) all bfloat16."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(n):
    kh, kw = (int(v) for v in rng.integers(1, 5, size=2))
    cin = int(rng.choice([1, 3, 8, 12]))
    x_shape = (int(rng.choice([1, 3, 12, 16])), kh + int(rng.integers(0, 8)),
               kw + int(rng.integers(0, 8)), cin)
    kernel_shape = (kh, kw, cin, int(rng.integers(1, 7)))
    stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
    padding = ["VALID", "SAME", 1, ((0, 2), (1, 0))][i % 4]
    mode = ["zeros", "edge"][int(rng.integers(0, 2))]
    dtype = "bf16" if i % 6 == 5 else ["f32", "bf16-f32"][i % 2]
    lowering = ["auto", "plan", "xla", "auto", "plan"][i % 5]
    if lowering == "plan":
      names = [n for n in FUZZ_LOWERINGS if n != "shift" or cin * kh * kw <= 12]
      lowering = mnn.conv_cpu.Plan(*(str(n) for n in rng.choice(names, size=3)),
                               int(rng.integers(1, 4)))
    cases.append(pytest.param(x_shape, kernel_shape, stride, padding, mode, dtype, lowering,
                              id=f"{i}-{x_shape}-{kernel_shape}-s{stride}-{dtype}-{lowering}"))
  return cases


def _reference_conv2d(x, kernel, bias, stride, padding, mode):
  """lax.conv_general_dilated of x and kernel in their common dtype, plus bias."""
  dtype = jnp.result_type(x, kernel)
  pads = mnn.explicit_padding(padding, x.shape[1:3], kernel.shape[:2], stride)
  x = jnp.pad(x.astype(dtype), ((0, 0), *pads, (0, 0)),
              mode="edge" if mode == "edge" else "constant")
  return _lax_conv(x, kernel.astype(dtype), stride) + bias


def _value_vjp_jvp(f, args, tangents, cotangent):
  """f(*args), its VJP (reverse mode) and its JVP (forward mode)."""
  y, vjp = jax.vjp(f, *args)
  return y, vjp(cotangent), jax.jvp(f, args, tangents)[1]


def _assert_close(got, want, tol, what):
  assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max(initial=0.0)))
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


FUZZ_CASES = _fuzz_cases()


@functools.cache
def _fuzz_results():
  """Every fuzz case's arguments' dtype and (ours, reference) outputs, VJPs and JVPs, in one
  program. Pieces of 64 KiB make "auto" cut the larger batches here too."""
  dtypes, cases = {}, {}
  for case in FUZZ_CASES:
    x_shape, kernel_shape, stride, padding, mode, dtype, lowering = case.values
    x_dtype, k_dtype, _ = FUZZ_DTYPES[dtype]
    rng = np.random.default_rng(abs(hash((x_shape, kernel_shape, stride))) % 2**32)
    def normal(shape, dtype, rng=rng):
      return jnp.asarray(rng.normal(size=shape), dtype)
    args = (normal(x_shape, x_dtype), normal(kernel_shape, k_dtype),
            normal(kernel_shape[-1:], k_dtype))
    tangents = tuple(normal(a.shape, a.dtype) for a in args)

    def ours(x, k, b, stride=stride, padding=padding, mode=mode, lowering=lowering):
      return mnn.conv2d(x, k, b, stride=stride, padding=padding, padding_mode=mode,
                        lowering=lowering)

    def reference(x, k, b, stride=stride, padding=padding, mode=mode):
      return _reference_conv2d(x, k, b, stride, padding, mode)

    out_shape = jax.eval_shape(reference, *args)
    cotangent = normal(out_shape.shape, out_shape.dtype)
    dtypes[case.values] = jnp.result_type(*args)
    cases[case.values] = (lambda a, t, c, ours=ours, reference=reference: (
        _value_vjp_jvp(ours, a, t, c), _value_vjp_jvp(reference, a, t, c)),
                      (args, tangents, cotangent))
  with pytest.MonkeyPatch.context() as m:
    m.setattr(mnn.conv_cpu, "CHUNK_BYTES", 64 << 10)  # Read when "auto" plans, as traced.
    return dtypes, _run_all(cases)


@pytest.mark.parametrize("x_shape, kernel_shape, stride, padding, mode, dtype, lowering",
                         FUZZ_CASES)
def test_conv2d_fuzz_values_vjps_and_jvps_equal_lax_conv(x_shape, kernel_shape, stride, padding,
                                                        mode, dtype, lowering):
  """Outputs, VJPs and JVPs (each in the dtype lax gives) of every lowering choice."""
  key = (x_shape, kernel_shape, stride, padding, mode, dtype, lowering)
  dtypes, results = _fuzz_results()
  got, want = results[key]
  assert want[0].dtype == dtypes[key]
  for what, g, w in zip(["output", "dx", "dkernel", "dbias", "jvp"],
                        jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _assert_close(g, w, FUZZ_DTYPES[dtype][2], what)


@pytest.mark.parametrize("lowering", ["auto", mnn.conv_cpu.Plan("xla", "band2", "patches", 2)])
def test_conv2d_hessian_vector_products_equal_lax_conv(lowering):
  """Forward over reverse (jvp of grad) and reverse over reverse (grad of a grad norm)."""
  x = jnp.asarray(RNG.normal(size=(5, 7, 6, 8)), jnp.float32)
  kernel = jnp.asarray(RNG.normal(size=(3, 3, 8, 4)) / 8, jnp.float32)
  bias = jnp.asarray(RNG.normal(size=(4,)), jnp.float32)

  def derivatives(conv):
    def loss(x, k, b):
      return jnp.sum(jnp.tanh(conv(x, k, b)) ** 2)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    hvp = jax.jvp(grad, (x, kernel, bias), (x, kernel, bias))[1]
    grad_of_grad = jax.grad(lambda k: sum(jnp.sum(g ** 2) for g in grad(x, k, bias)))(kernel)
    return hvp, grad_of_grad

  got, want = jit(lambda: (
      derivatives(lambda x, k, b: mnn.conv2d(x, k, b, padding=1, lowering=lowering)),
      derivatives(lambda x, k, b: _reference_conv2d(x, k, b, (1, 1), 1, "zeros"))))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(g, w, 1e-3, "second derivative")


def _primitives(jaxpr) -> set[str]:
  return {str(eqn.primitive) for eqn in jaxpr.eqns}


def test_auto_lowering_follows_the_backend(monkeypatch):
  """"auto": the CPU plan (a custom JVP around band products) on "cpu", XLA's convolution
  with plain autodiff elsewhere; "xla" and forced plans whatever the backend."""
  x, kernel = jnp.ones((4, 9, 9, 8)), jnp.ones((3, 3, 8, 4))

  def primitives(lowering):
    f = lambda x: mnn.conv2d(x, kernel, padding="SAME", lowering=lowering)
    return _primitives(jax.make_jaxpr(lambda x: jax.jvp(f, (x,), (x,)))(x).jaxpr)

  monkeypatch.setattr(mnn.conv, "_backend", lambda: "cpu")
  assert "custom_jvp_call" in primitives("auto")
  assert "conv_general_dilated" not in primitives(mnn.conv_cpu.Plan("band", "band", "band"))
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(mnn.conv, "_backend", lambda: backend)
    assert primitives("auto") == primitives("xla")
    assert "custom_jvp_call" not in primitives("auto")
    assert "conv_general_dilated" in primitives("auto")
    assert "conv_general_dilated" not in primitives(mnn.conv_cpu.Plan("band", "band", "band"))


@pytest.mark.parametrize("lowering, match", [
    ("band5", r'Plan\("band5", "band5", "band5"\)'), ("fast", '"auto".*"xla"'),
    (("band0", "xla", "xla"), r"Plan.forward: .*band<n> with n >= 1"),
    (("xla", "xla"), "a plan must be Plan"), (("xla", "xla", "xla", 0), "batch_chunks"),
    (3, "a plan must be Plan")])
def test_bad_lowerings_raise_clear_errors(lowering, match):
  with pytest.raises(ValueError, match="conv2d: .*" + match):
    mnn.conv2d(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), lowering=lowering)


def test_conv2d_module_dtypes_promote_as_flax():
  """bfloat16 input, float32 params (8 channels: an XLA-forward plan): float32 out, as
  flax.linen.Conv; `dtype` casts everything, `param_dtype` makes the params."""
  x = jnp.asarray(RNG.normal(size=(2, 9, 9, 8)), jnp.bfloat16)
  module = mnn.Conv2D(4, 3, padding="SAME")
  key = jax.random.key(0)
  params = jit(module.init)(key, x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  half = jax.eval_shape(mnn.Conv2D(4, 3, param_dtype=jnp.bfloat16).init, key, x)
  assert {p.dtype for p in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
  y, flax_y, y_bf16 = jit(lambda p, x: (
      module.apply(p, x), nn.Conv(4, (3, 3), padding="SAME").apply(p, x),
      mnn.Conv2D(4, 3, padding="SAME", dtype=jnp.bfloat16).apply(p, x)))(params, x)
  assert y.dtype == flax_y.dtype == jnp.float32 and y_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y, flax_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(y_bf16, np.float32), y, rtol=5e-2, atol=5e-2)


def test_avg_pool_of_bfloat16_sums_in_float32():
  """Windows of values near 100 (bfloat16 steps of 0.5): a bfloat16 running sum would be
  off by several steps; summed in float32, the mean is the float32 mean rounded once."""
  x = jnp.asarray(RNG.normal(size=(1, 12, 12, 2)) + 100, jnp.bfloat16)
  pools = [(4,), (3, 1, 1), (2, 1, "SAME")]
  got, want = jit(lambda x: ([mnn.avg_pool(x, *a) for a in pools],
                             [mnn.avg_pool(x.astype(jnp.float32), *a).astype(x.dtype)
                              for a in pools]))(x)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
