"""The CPU lowering of `mmjax.nn.conv2d`: per shape, the form XLA's CPU backend runs fastest.

`conv_valid(x, kernel, stride, plan)` computes a VALID convolution of an already padded
x exactly as `jax.lax.conv_general_dilated` does (NHWC, HWIO), in the forms `plan`
names. Each form is a short pure function of the padded input and the kernel whose
autodiff gives its gradients:

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
them from the shapes. A mixed or cut plan is a `jax.custom_jvp` whose tangent,
conv(dx, kernel) + conv(x, dkernel), uses the input- and kernel-gradient forms: forward
mode (`jax.jvp`, `jax.jacfwd`) evaluates it, reverse mode transposes it into those
forms' VJPs, and both differentiate again (Hessian-vector products).

x and kernel are cast to their common dtype first (bfloat16 with float32 gives float32),
so the output has dtype jnp.result_type(x, kernel, bias) and each gradient its own
input's dtype.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn.window import conv_output_size, static_int, windows


def _out_size(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> tuple[int, int]:
  """Output (height, width) of a VALID convolution of padded `x`."""
  return (conv_output_size(x.shape[1], kernel.shape[0], stride[0]),
          conv_output_size(x.shape[2], kernel.shape[1], stride[1]))


def conv_shift(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> jax.Array:
  """VALID convolution of padded `x` as a sum of kh*kw*cin shifted views times taps.

  Elementwise, so XLA fuses it into one loop with no patches in memory: alone, the
  fastest forward when cin is 1. But whatever XLA fuses into that loop can stop its
  vectorization (a tanh of a many-term sum does), and its autodiff
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


def promote(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
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
  x, kernel = promote(x, kernel)
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
  so only one piece's rows are in memory: on a CPU they stay in cache, and XLA's
  scratch buffer for the whole step stays small enough for the allocator to reuse
  instead of mapping it afresh every step.
  """
  pieces = max(1, -(-batch * bytes_per_image // CHUNK_BYTES))
  return next((n for n in range(pieces, 2 * pieces + 1) if batch % n == 0), pieces)


def choose_plan(x_shape, kernel_shape, stride) -> Plan:
  """The lowering of the forward, input gradient and kernel gradient, by shape.

  The rules, chosen by timing each part of each convolution of LeNet-5 and SmallCNN
  alone (benchmarks/conv_lowering.py) and then whole train steps:
  - "band" in blocks of the divisor of the output width nearest to kw (`_band_block`):
    a block reads about 2 kw - 1 input columns, so the band's zero multiplies stay
    near (2 kw - 1) / kw times the useful ones while the products stay wide enough;
    wider blocks, or the full band, waste more multiplies, narrower ones make the
    products too small.
  - For the forward, XLA's convolution instead when cin >= 8 and the blocks are wider
    than one column: there it beats the band; with 1-column blocks (plain im2col
    without the band's zeros) it does not.
  - Not "patches" (one concatenation along the channel axis, a scalar copy per tap
    when cin is small) nor "shift" (fastest alone for one input channel, but an
    activation fused into its many-term loop stops XLA vectorizing it).
  - Images too large for even one image's rows in CHUNK_BYTES: XLA's convolution
    throughout (it makes no rows).
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
  if bytes_per_image > CHUNK_BYTES:  # Rows of even one image would not fit.
    return Plan("xla", "xla", "xla")
  return Plan(*lowerings, _batch_chunks(x_shape[0], bytes_per_image))
