"""2-D convolution as a pure function, with a thin linen module over it.

`conv2d` computes exactly `jax.lax.conv_general_dilated` (NHWC, HWIO; tested to float
tolerance, reverse- and forward-mode derivatives included). On the CPU backend it lowers
it, per shape, to whichever form XLA runs fastest on a CPU; on any other backend (GPU,
TPU) it is XLA's convolution with plain autodiff. `conv2d(..., lowering=...)` and
`Conv2D.lowering` choose: "auto" (that rule; the backend is `jax.default_backend()` when
`conv2d` is traced), "xla" (XLA's convolution everywhere) or a `Plan` (forced). Each CPU
form is a short pure function of the padded input and the kernel whose autodiff gives
its gradients:

  "shift"    the sum over taps of shifted input views times the kernel taps: elementwise,
             fused by XLA into one loop (no patches in memory). For 1 input channel.
  "band"     one matrix product per output row: the kh input rows that feed it, times a
             banded matrix built from the kernel (K = kh * width * cin, N = out_w * cout).
             "band<n>" cuts the output width into blocks of n columns, trading the band's
             zero multiplies (width / kw times the useful ones) for smaller products.
  "xla"      XLA's own convolution.
  "patches"  one matrix product over gathered kh*kw patches (im2col).

The forward, the input gradient and the kernel gradient may each use a different form,
and a large batch is computed in pieces one after another (`Plan`); `choose_plan` picks
them from the shapes. The docstrings of `choose_plan` and `_batch_chunks` give the
measurements behind the choices. A mixed or cut plan is a `jax.custom_jvp` whose
tangent, conv(dx, kernel) + conv(x, dkernel), uses the input- and kernel-gradient
forms: forward mode (`jax.jvp`, `jax.jacfwd`) evaluates it, reverse mode transposes it
into those forms' VJPs, and both differentiate again (Hessian-vector products).

x and kernel are cast to their common dtype first (bfloat16 with float32 gives float32),
so the output has dtype jnp.result_type(x, kernel, bias) on every path and each gradient
its own input's dtype.
"""
import functools
import operator
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Padding = str | int | Sequence[Sequence[int]]
PADDING_MODES = {"zeros": "constant", "edge": "edge"}


def static_int(value, what: str, fn: str, minimum: int = 0) -> int:
  """A Python or NumPy integer >= `minimum` (not a bool) -> int, else a ValueError
  "`fn`: `what` must be ...". For static arguments: checked once, at trace time."""
  try:
    if isinstance(value, (bool, np.bool_)):
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{fn}: {what} must be an integer >= {minimum}, got {value!r}.") from None
  if value < minimum:
    raise ValueError(f"{fn}: {what} must be an integer >= {minimum}, got {value!r}.")
  return value


def pair(value, name: str = "value", *, fn: str = "pair", minimum: int = 1) -> tuple[int, int]:
  """An int or a pair of ints (Python or NumPy, each >= `minimum`) -> (height, width).

  Anything else (a float, a bool, 0 for a stride) is a ValueError naming `fn` and `name`.
  """
  if isinstance(value, (str, bytes)) or not np.iterable(value):
    value = static_int(value, name, fn, minimum)
    return value, value
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f"{fn}: {name} must be an integer >= {minimum} or a pair of them, "
                     f"got {value!r}.")
  return tuple(static_int(v, name, fn, minimum) for v in value)


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
  """floor((size - kernel + 2 * padding) / stride) + 1: convolution and pooling alike."""
  return (size - kernel + 2 * padding) // stride + 1


def explicit_padding(padding: Padding, size: tuple[int, int], window: tuple[int, int],
                     stride: tuple[int, int], *, fn: str = "explicit_padding"
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
  """"VALID", "SAME", an int p or ((top, bottom), (left, right)) -> the explicit pairs.

  "SAME" gives ceil(size / stride) outputs, the extra padding at the bottom/right
  (as in TensorFlow and XLA). Integers may be Python or NumPy ones, >= 0; anything
  else is a ValueError naming `fn`.
  """
  how = 'use "VALID", "SAME", an int >= 0 or ((top, bottom), (left, right))'
  if isinstance(padding, str):
    if padding.upper() == "VALID":
      return (0, 0), (0, 0)
    if padding.upper() == "SAME":
      window, stride = pair(window, "window", fn=fn), pair(stride, "stride", fn=fn)
      pads = []
      for n, k, s in zip(size, window, stride):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    raise ValueError(f"{fn}: padding={padding!r}: {how}.")
  if not np.iterable(padding):
    p = static_int(padding, "padding", fn)
    return (p, p), (p, p)
  pads = tuple(tuple(p) if np.iterable(p) else p for p in padding)
  if len(pads) != 2 or any(not isinstance(p, tuple) or len(p) != 2 for p in pads):
    raise ValueError(f"{fn}: padding={padding!r}: {how}.")
  return tuple(tuple(static_int(v, "padding", fn) for v in p) for p in pads)


def pad2d(x: jax.Array, pads, mode: str = "zeros", value: float = 0.0, *,
          fn: str = "pad2d") -> jax.Array:
  """Pads [batch, height, width, channels] spatially; mode "zeros" (or `value`) or "edge"."""
  if mode not in PADDING_MODES:
    raise ValueError(f"{fn}: padding_mode={mode!r}: use one of {sorted(PADDING_MODES)}.")
  if pads == ((0, 0), (0, 0)):
    return x
  widths = ((0, 0), *pads, (0, 0))
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, mode="constant", constant_values=value)


def windows(x: jax.Array, window: tuple[int, int], stride: tuple[int, int]) -> list[jax.Array]:
  """The kh*kw strided views of padded [b, h, w, c]: each [b, out_h, out_w, c], row-major.

  View (i, j) holds x[:, i + stride_h * oh, j + stride_w * ow, :] at (oh, ow).
  """
  (kh, kw), (sh, sw) = window, stride
  out_h = conv_output_size(x.shape[1], kh, sh)
  out_w = conv_output_size(x.shape[2], kw, sw)
  if out_h < 1 or out_w < 1:
    raise ValueError(f"Window {window} is larger than the padded input {x.shape[1:3]}.")
  return [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


def _out_size(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> tuple[int, int]:
  """Output (height, width) of a VALID convolution of padded `x`."""
  return (conv_output_size(x.shape[1], kernel.shape[0], stride[0]),
          conv_output_size(x.shape[2], kernel.shape[1], stride[1]))


def conv_shift(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> jax.Array:
  """VALID convolution of padded `x` as a sum of kh*kw*cin shifted views times taps.

  Elementwise, so XLA fuses it into one loop with no patches in memory: alone, the
  fastest forward when cin is 1. But whatever XLA fuses into that loop can stop its
  vectorization (a tanh does, beyond ~9 terms; see `choose_plan`), and its autodiff
  kernel gradient is slow (kh*kw*cin separate reductions).
  """
  kh, kw, cin, _ = kernel.shape
  y = 0
  for view, (i, j) in zip(windows(x, (kh, kw), stride), np.ndindex(kh, kw)):
    for c in range(cin):
      y = y + view[..., c:c + 1] * kernel[i, j, c]
  return y


def _band_selector(kw: int, width: int, out_w: int, stride: int, dtype) -> jax.Array:
  """S[j, v, w] = 1 where input column v is tap j of output column w (v = stride * w + j)."""
  j, v, w = np.ogrid[:kw, :width, :out_w]
  return jnp.asarray(v - stride * w == j, dtype)


def band_matrix(kernel: jax.Array, width: int, out_w: int, stride: int) -> jax.Array:
  """[kh * width * cin, out_w * cout]: T[(i, v, c), (w, o)] = kernel[i, v - stride * w, c, o].

  Zero outside the band 0 <= v - stride * w < kw. Built by a contraction with a 0/1
  selector, so its gradient is the same contraction transposed.
  """
  kh, kw, cin, cout = kernel.shape
  band = jnp.einsum("ijco,jvw->ivcwo", kernel,
                    _band_selector(kw, width, out_w, stride, kernel.dtype))
  return band.reshape(kh * width * cin, out_w * cout)


def conv_band(x: jax.Array, kernel: jax.Array, stride: tuple[int, int],
              block: int | None = None) -> jax.Array:
  """VALID convolution of padded `x` as matrix products with a banded kernel matrix.

  Each output row is (its kh input rows, flattened) @ `band_matrix`. With `block` the
  output width is cut into blocks of that many columns, each reading only the input
  columns it needs, all multiplied by one smaller band matrix.
  """
  (kh, kw, cin, cout), (sh, sw) = kernel.shape, stride
  b = x.shape[0]
  out_h, out_w = _out_size(x, kernel, stride)
  block = out_w if block is None else min(block, out_w)
  blocks = -(-out_w // block)
  width = sw * (block - 1) + kw  # Input columns one block reads.
  needed = sw * block * (blocks - 1) + width
  if needed > x.shape[2]:  # The last block runs past the input: pad, crop the output.
    x = jnp.pad(x, ((0, 0), (0, 0), (0, needed - x.shape[2]), (0, 0)))
  x = x[:, :, :needed]
  if blocks > 1:  # [b, h, blocks, width, c]
    x = jnp.stack([x[:, :, s * sw * block:s * sw * block + width] for s in range(blocks)], axis=2)
  else:
    x = x[:, :, None]
  rows = jnp.stack([x[:, i:i + sh * (out_h - 1) + 1:sh] for i in range(kh)], axis=3)
  y = jnp.dot(rows.reshape(b * out_h * blocks, kh * width * cin),
              band_matrix(kernel, width, block, sw))
  return y.reshape(b, out_h, blocks * block, cout)[:, :, :out_w]


def _promote(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x and kernel cast to jnp.result_type(x, kernel), as jnp's binary operations do."""
  dtype = jnp.result_type(x, kernel)
  return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)


def conv_xla(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> jax.Array:
  """VALID convolution of padded `x` by XLA's convolution."""
  return jax.lax.conv_general_dilated(x, kernel, stride, "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_patches(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> jax.Array:
  """VALID convolution of padded `x` as one matrix product over gathered patches."""
  kh, kw, cin, cout = kernel.shape
  views = windows(x, (kh, kw), stride)
  patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


LOWERINGS = {"shift": conv_shift, "band": conv_band, "xla": conv_xla, "patches": conv_patches}


def lowering(name: str):
  """"shift", "band", "band<n>" (blocks of n >= 1 output columns), "xla" or "patches" ->
  the function (padded x, kernel, stride) -> y."""
  if isinstance(name, str) and name[:4] == "band" and name[4:].isdigit() and int(name[4:]) > 0:
    return functools.partial(conv_band, block=int(name[4:]))
  if not isinstance(name, str) or name not in LOWERINGS:
    raise ValueError(f"Unknown convolution lowering {name!r}: use one of "
                     f"{sorted(LOWERINGS)} or band<n> with n >= 1.")
  return LOWERINGS[name]


class Plan(NamedTuple):
  """How to lower one convolution: a lowering for the output, one for the input gradient,
  one for the kernel gradient, and how many pieces to cut the batch into.

  The forward-mode tangent dy = conv(dx, kernel) + conv(x, dkernel) uses the input- and
  kernel-gradient lowerings too (reverse mode is its transpose)."""
  forward: str
  input_grad: str
  kernel_grad: str
  batch_chunks: int = 1


def check_plan(plan, fn: str = "check_plan") -> Plan:
  """A `Plan` (or a tuple of its fields) with known lowerings and batch_chunks >= 1 ->
  the Plan, else a ValueError naming `fn`."""
  how = 'e.g. Plan("band5", "band5", "band5") or Plan("xla", "band4", "band4", 2)'
  if not isinstance(plan, tuple) or not 3 <= len(plan) <= 4:
    raise ValueError(f"{fn}: a plan must be Plan(forward, input_grad, kernel_grad, "
                     f"batch_chunks=1), {how}; got {plan!r}.")
  plan = Plan(*plan)
  for field in ("forward", "input_grad", "kernel_grad"):
    try:
      lowering(getattr(plan, field))
    except ValueError as error:
      raise ValueError(f"{fn}: Plan.{field}: {error}") from None
  static_int(plan.batch_chunks, "Plan.batch_chunks", fn, minimum=1)
  return plan


def _split_batch(a: jax.Array, chunks: int) -> jax.Array:
  return a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])


def _merge_batch(a: jax.Array) -> jax.Array:
  return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _by_pieces(f, chunks: int, *batched: jax.Array) -> jax.Array:
  """f(*batched) over the batch in `chunks` pieces one after another (`jax.lax.map`)."""
  if chunks == 1:
    return f(*batched)
  pieces = tuple(_split_batch(a, chunks) for a in batched)
  return _merge_batch(jax.lax.map(lambda a: f(*a), pieces))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _conv_planned(x, kernel, bias, stride, plan):
  """The forward lowering plus bias, over the batch in `plan.batch_chunks` pieces."""
  forward = lowering(plan.forward)
  return _by_pieces(lambda x: forward(x, kernel, stride) + bias, plan.batch_chunks, x)


def _is_zero(tangent) -> bool:
  """Whether a tangent given to a `symbolic_zeros` JVP rule is a symbolic zero."""
  return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


@functools.partial(_conv_planned.defjvp, symbolic_zeros=True)
def _conv_planned_jvp(stride, plan, primals, tangents):
  """dy = conv(dx, kernel) by the input-gradient lowering + conv(x, dkernel) by the
  kernel-gradient lowering + dbias, piece by piece.

  The convolution is bilinear, so this is its JVP whatever the lowerings; reverse mode
  transposes it, which makes the input gradient the VJP of `plan.input_grad` and the
  kernel gradient that of `plan.kernel_grad`. Each piece is rematerialized
  (`jax.checkpoint`): the backward pass rebuilds one piece's rows at a time instead of
  keeping every piece's rows from the forward pass.
  """
  (x, kernel, bias), (dx, dkernel, dbias) = primals, tangents
  y = _conv_planned(x, kernel, bias, stride, plan)
  input_part, kernel_part = lowering(plan.input_grad), lowering(plan.kernel_grad)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def piece(x, dx=None):
    dy = 0 if dx is None else input_part(dx, kernel, stride)
    if not _is_zero(dkernel):
      dy = dy + kernel_part(x, dkernel, stride)
    return dy if _is_zero(dbias) else dy + dbias

  if _is_zero(dx) and _is_zero(dkernel):  # Only the bias moves.
    dy = jnp.broadcast_to(dbias, y.shape)
  elif _is_zero(dx):  # A fixed input (the data): no input term to compute.
    dy = _by_pieces(piece, plan.batch_chunks, x)
  else:
    dy = _by_pieces(piece, plan.batch_chunks, x, dx)
  return y, dy.astype(y.dtype)


def conv_valid(x: jax.Array, kernel: jax.Array, stride: tuple[int, int], plan: Plan,
               bias: jax.Array | None = None) -> jax.Array:
  """VALID convolution of (already padded) `x` plus `bias`, lowered as `plan` says.

  x and kernel are first cast to their common dtype; the output has dtype
  jnp.result_type(x, kernel, bias), each gradient its own input's dtype."""
  plan = Plan(*plan)
  x, kernel = _promote(x, kernel)
  if plan.batch_chunks == 1 and plan.forward == plan.input_grad == plan.kernel_grad:
    y = lowering(plan.forward)(x, kernel, stride)  # Autodiff shares work with the forward.
    return y if bias is None else y + bias
  if bias is None:
    bias = jnp.zeros(kernel.shape[-1], jnp.result_type(x, kernel))
  batch = x.shape[0]
  padded = -(-batch // plan.batch_chunks) * plan.batch_chunks
  if padded != batch:  # Zero images: they add nothing to the kernel gradient.
    x = jnp.pad(x, ((0, padded - batch), (0, 0), (0, 0), (0, 0)))
  return _conv_planned(x, kernel, bias, stride, plan)[:batch]


def _band_block(out_w: int, kw: int, stride: int) -> int:
  """Output columns per band block: the divisor of `out_w` nearest to (kw - 1) / stride
  + 1 (kw at stride 1; the smaller on a tie), so a block reads about 2 kw - 1 input
  columns. 1 for 1-wide kernels, whose neighbouring outputs share no input."""
  target = (kw - 1) / stride + 1
  return min((n for n in range(1, out_w + 1) if out_w % n == 0),
             key=lambda n: (abs(n - target), n))


def _floats_per_image(name: str, x_shape, kernel_shape, stride) -> int:
  """Size of the largest array a lowering makes per image: its rows or patches, or y."""
  kh, kw, cin, cout = kernel_shape
  out_h = conv_output_size(x_shape[1], kh, stride[0])
  out_w = conv_output_size(x_shape[2], kw, stride[1])
  if name.startswith("band"):
    block = min(int(name[4:] or out_w), out_w)
    width = stride[1] * (block - 1) + kw
    return max(out_h * -(-out_w // block) * kh * width * cin, out_h * out_w * cout)
  if name == "patches":
    return out_h * out_w * max(kh * kw * cin, cout)
  return out_h * out_w * cout


# At most this many bytes of rows (or patches, or output) per piece of the batch.
CHUNK_BYTES = 4 << 20


def _batch_chunks(batch: int, bytes_per_image: int) -> int:
  """Pieces to cut the batch into so one piece's rows take at most CHUNK_BYTES; a
  divisor of the batch if one is near (else the batch is padded with zero images).

  The pieces run one after another (`jax.lax.map` forward, `jax.lax.scan` backward),
  so only one piece's rows are in memory. This matters twice on a CPU: the rows stay
  in cache, and XLA's scratch buffer for the whole step stays small. LeNet-5 at batch
  512 in one piece needs 52 MiB of scratch, which glibc maps afresh for every step
  (above its 32 MiB mmap threshold): 13,206 page faults and ~24 ms of kernel time per
  step. In pieces of 128: 29 MiB, no page faults, 11.2k -> 17.9k images/s (same
  sitting). At batch 128 LeNet-5 stays in one piece (pieces of 64: 16.6k -> 15.6k);
  SmallCNN's conv2 goes in two (32.2 -> 29.7 MiB of scratch, 3.95k -> 5.76k images/s).
  """
  pieces = max(1, -(-batch * bytes_per_image // CHUNK_BYTES))
  return next((n for n in range(pieces, 2 * pieces + 1) if batch % n == 0), pieces)


def choose_plan(x_shape, kernel_shape, stride) -> Plan:
  """The lowering of the forward, input gradient and kernel gradient, by shape.

  Measured on the project's 2-core AMD EPYC (Zen 4) with XLA's CPU backend (JAX
  0.10.2): each part of each convolution of LeNet-5 and SmallCNN alone, batch 128
  (the piece size at batch 512), ms, fastest of 9 alternating rounds
  (benchmarks/conv_lowering.py), then whole train steps (benchmarks/README.md):

    layer (cin->cout, padded input)  part     band<n>  band  band1   xla  patches  shift
    LeNet C1 (1->6, 32x32, 5x5)      forward  1.05 (4) 1.83  2.75   4.51   5.15    5.15
                                     kernel   0.81     1.54  2.44   6.32   6.24    7.76
    LeNet C3 (6->16, 14x14, 5x5)     forward  1.34 (5) 1.39  1.17   1.19   2.01    2.53
                                     input    1.33     1.39  2.97   4.02   2.34   17.3
                                     kernel   0.97     1.28  1.33   1.44   1.90    7.33
    SmallCNN conv2 (10->16, 18x18)   forward  2.78 (7) 4.82  5.51   2.21  18.1       -
                                     input    3.48     4.22 24.8    5.69   8.22      -
                                     kernel   3.36     4.67  9.54   8.44  23.6       -
    SmallCNN conv3 (16->64, 9x9, 3x3) forward    -     2.13  0.89   1.42   0.87    3.25
                                     input       -     2.21  0.99   1.64   0.84   11.7
                                     kernel      -     2.12  1.12   1.64   1.46    7.09

  So:
  - "band" in blocks of the divisor of the output width nearest to kw (4, 5, 7 and 1
    above; `_band_block`): a block reads about 2 kw - 1 input columns, so the band's
    zero multiplies stay near (2 kw - 1) / kw times the useful ones, while the products
    stay wide enough. Blocks of 7 for C1 (1.39 / 0.77 ms) are a little slower (whole
    LeNet-5 steps: -6% at batch 128, -4% at 512); of 2 for conv2 ~2x slower (4.50 /
    7.17 / 6.84 ms); the full band ("band") wastes more.
  - For the forward, XLA's convolution instead when cin >= 8 and the blocks are wider
    than one column (conv2): there it beats the band; with 1-column blocks (conv3,
    plain im2col without the band's zeros) it does not.
  - "patches" (one concatenation along the channel axis) is slow whenever cin is
    small: a few floats per tap is a scalar copy. "shift" is the fastest C1 forward
    alone (0.9 ms without the tanh) but with the model's tanh fused into its 25-term
    loop XLA no longer vectorizes the loop (5.2 ms here; 9 terms still vectorize).
  When all three parts use one lowering and the batch is one piece, plain autodiff is
  used (no custom JVP), so the kernel gradient reuses the forward's rows. The batch is
  cut into pieces by `_batch_chunks`. These plans are for the CPU backend: `conv2d`
  uses XLA's convolution elsewhere unless told otherwise.
  """
  kh, kw, cin, _ = kernel_shape
  out_w = conv_output_size(x_shape[2], kw, stride[1])
  block = _band_block(out_w, kw, stride[1])
  band = f"band{block}"
  lowerings = ("xla" if cin >= 8 and block > 1 else band, band, band)
  bytes_per_image = 4 * max(_floats_per_image(name, x_shape, kernel_shape, stride)
                            for name in lowerings)
  if bytes_per_image > CHUNK_BYTES:  # Large images (not measured here): rows of even
    return Plan("xla", "xla", "xla")  # one image would not fit; XLA makes none.
  return Plan(*lowerings, _batch_chunks(x_shape[0], bytes_per_image))


def _backend() -> str:
  """The backend that `lowering="auto"` lowers for: `jax.default_backend()` ("cpu",
  "gpu", "tpu"), read when `conv2d` is traced. Under `jax.jit` a program is traced for
  the default backend's devices unless told otherwise; code that places a CPU-traced
  program on another backend (or the reverse) should pass `lowering` explicitly."""
  return jax.default_backend()


def _check_lowering(value, fn: str) -> str | Plan:
  """"auto", "xla" or a valid `Plan` -> itself, else a ValueError naming `fn`."""
  if isinstance(value, str):
    if value in ("auto", "xla"):
      return value
    try:  # One lowering's name: say how to force it everywhere.
      lowering(value)
      example = f'Plan("{value}", "{value}", "{value}")'
    except ValueError:
      example = 'Plan("band5", "band5", "band5")'
    raise ValueError(f'{fn}: lowering={value!r}: use "auto" (the CPU plan on the CPU '
                     f'backend, XLA\'s convolution elsewhere), "xla", or an '
                     f'mmjax.nn.conv.Plan such as {example}.')
  return check_plan(value, fn)


def conv_lax(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride: tuple[int, int],
             pads, padding_mode: str = "zeros") -> jax.Array:
  """`lax.conv_general_dilated` with explicit `pads` (an "edge" border padded first), x
  and kernel cast to their common dtype, plus `bias`: plain XLA, plain autodiff."""
  x, kernel = _promote(x, kernel)
  if padding_mode != "zeros":
    x, pads = pad2d(x, pads, padding_mode, fn="conv2d"), ((0, 0), (0, 0))
  y = jax.lax.conv_general_dilated(x, kernel, stride, pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias is None else y + bias


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
           stride=1, padding: Padding = "VALID", padding_mode: str = "zeros",
           lowering: str | Plan = "auto") -> jax.Array:
  """2-D convolution (cross-correlation, as in every deep-learning library).

  Args:
    x: [batch, height, width, in_channels].
    kernel: [kh, kw, in_channels, out_channels].
    bias: [out_channels] or None.
    stride: int or (sh, sw), each >= 1.
    padding: "VALID", "SAME", an int p >= 0, or ((top, bottom), (left, right)).
    padding_mode: "zeros" (zero padding) or "edge" (border pixels repeated).
    lowering: "auto" (`choose_plan`'s plan on the CPU backend, XLA's convolution on any
      other; the backend is `jax.default_backend()` when traced), "xla" (XLA's
      convolution on every backend), or a `Plan` to force.
    Integers may be Python or NumPy ones.

  Returns:
    [batch, out_h, out_w, out_channels], out = floor((in - k + pad_total) / s) + 1, of
    dtype jnp.result_type(x, kernel, bias) (x and kernel are cast to their common dtype
    first); gradients come in each input's own dtype.

  Raises:
    ValueError, starting "conv2d:", for wrong shapes or arguments (checked on shapes
    and static values while tracing; nothing is checked at run time).
  """
  if jnp.ndim(x) != 4:
    raise ValueError(f"conv2d: x must be [batch, height, width, channels], got shape "
                     f"{jnp.shape(x)}.")
  if jnp.ndim(kernel) != 4:
    raise ValueError(f"conv2d: kernel must be [kh, kw, in, out], got shape {jnp.shape(kernel)}.")
  kh, kw, cin, cout = kernel.shape
  if kh < 1 or kw < 1:
    raise ValueError(f"conv2d: the kernel's window must be at least 1x1, got kernel shape "
                     f"{kernel.shape}.")
  if x.shape[-1] != cin:
    raise ValueError(f"conv2d: x has {x.shape[-1]} channels but the kernel expects {cin} "
                     f"(kernel shape {kernel.shape}).")
  if bias is not None and jnp.shape(bias) != (cout,):
    raise ValueError(f"conv2d: bias must be [out_channels] = ({cout},), got shape "
                     f"{jnp.shape(bias)}.")
  stride = pair(stride, "stride", fn="conv2d")
  pads = explicit_padding(padding, x.shape[1:3], (kh, kw), stride, fn="conv2d")
  if padding_mode not in PADDING_MODES:
    raise ValueError(f"conv2d: padding_mode={padding_mode!r}: use one of "
                     f"{sorted(PADDING_MODES)}.")
  how = _check_lowering(lowering, "conv2d")
  padded = tuple(n + p0 + p1 for n, (p0, p1) in zip(x.shape[1:3], pads))
  out_h, out_w = (conv_output_size(n, k, s) for n, k, s in zip(padded, (kh, kw), stride))
  if out_h < 1 or out_w < 1:
    raise ValueError(f"conv2d: the kernel window {(kh, kw)} is larger than the padded input "
                     f"{padded}; pad more or use a smaller kernel.")
  if how == "auto" and _backend() != "cpu":
    how = "xla"
  if how == "xla":
    return conv_lax(x, kernel, bias, stride, pads, padding_mode)
  x = pad2d(x, pads, padding_mode, fn="conv2d")
  # Rows and columns past the last window (strides, SAME padding) are never read.
  x = x[:, :stride[0] * (out_h - 1) + kh, :stride[1] * (out_w - 1) + kw]
  plan = choose_plan(x.shape, kernel.shape, stride) if how == "auto" else how
  return conv_valid(x, kernel, stride, plan, bias)


class Conv2D(nn.Module):
  """Linen module over `conv2d`: params `kernel` [kh, kw, in, out] and `bias` [out].

  As in `flax.linen.Conv`: params are created in `param_dtype`; x, kernel and bias are
  cast to `dtype` (None: their common dtype, `flax.linen.dtypes.promote_dtype`) before
  the convolution. `lowering` is passed to `conv2d`.
  """
  features: int
  kernel_size: int | tuple[int, int]
  stride: int | tuple[int, int] = 1
  padding: Padding = "VALID"
  padding_mode: str = "zeros"
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  lowering: str | Plan = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = pair(self.kernel_size, "kernel_size", fn="Conv2D")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, jnp.shape(x)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv2d(x, kernel, bias, stride=self.stride, padding=self.padding,
                  padding_mode=self.padding_mode, lowering=self.lowering)
