"""2-D convolution as a pure function, with a thin linen module over it.

`conv2d` computes exactly `jax.lax.conv_general_dilated` (NHWC, HWIO; tested to float
tolerance, reverse- and forward-mode derivatives included). On the CPU backend it lowers
it, per shape, to whichever form XLA runs fastest on a CPU (mmjax/nn/conv_cpu.py); on any
other backend (GPU, TPU) it is XLA's convolution with plain autodiff.
`conv2d(..., lowering=...)` and `Conv2D.lowering` choose: "auto" (that rule; the backend
is `jax.default_backend()` when `conv2d` is traced), "xla" (XLA's convolution
everywhere) or a `conv_cpu.Plan` (forced).

x and kernel are cast to their common dtype first (bfloat16 with float32 gives float32),
so the output has dtype jnp.result_type(x, kernel, bias) on every path and each gradient
its own input's dtype.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import conv_cpu
from mmjax.nn.window import conv_output_size, pair, static_int

Padding = str | int | Sequence[Sequence[int]]
PADDING_MODES = {"zeros": "constant", "edge": "edge"}


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


def _backend() -> str:
  """The backend that `lowering="auto"` lowers for: `jax.default_backend()` ("cpu",
  "gpu", "tpu"), read when `conv2d` is traced. Under `jax.jit` a program is traced for
  the default backend's devices unless told otherwise; code that places a CPU-traced
  program on another backend (or the reverse) should pass `lowering` explicitly."""
  return jax.default_backend()


def _check_lowering(value, fn: str) -> str | conv_cpu.Plan:
  """"auto", "xla" or a valid `Plan` -> itself, else a ValueError naming `fn`."""
  if isinstance(value, str):
    if value in ("auto", "xla"):
      return value
    try:  # One lowering's name: say how to force it everywhere.
      conv_cpu.lowering(value)
      example = f'Plan("{value}", "{value}", "{value}")'
    except ValueError:
      example = 'Plan("band5", "band5", "band5")'
    raise ValueError(f'{fn}: lowering={value!r}: use "auto" (the CPU plan on the CPU '
                     f'backend, XLA\'s convolution elsewhere), "xla", or an '
                     f'mmjax.nn.conv_cpu.Plan such as {example}.')
  return conv_cpu.check_plan(value, fn)


def conv_lax(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride: tuple[int, int],
             pads, padding_mode: str = "zeros") -> jax.Array:
  """`lax.conv_general_dilated` with explicit `pads` (an "edge" border padded first), x
  and kernel cast to their common dtype, plus `bias`: plain XLA, plain autodiff."""
  x, kernel = conv_cpu.promote(x, kernel)
  if padding_mode != "zeros":
    x, pads = pad2d(x, pads, padding_mode, fn="conv2d"), ((0, 0), (0, 0))
  y = jax.lax.conv_general_dilated(x, kernel, stride, pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias is None else y + bias


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
           stride=1, padding: Padding = "VALID", padding_mode: str = "zeros",
           lowering: str | conv_cpu.Plan = "auto") -> jax.Array:
  """2-D convolution (cross-correlation, as in every deep-learning library).

  Args:
    x: [batch, height, width, in_channels].
    kernel: [kh, kw, in_channels, out_channels].
    bias: [out_channels] or None.
    stride: int or (sh, sw), each >= 1.
    padding: "VALID", "SAME", an int p >= 0, or ((top, bottom), (left, right)).
    padding_mode: "zeros" (zero padding) or "edge" (border pixels repeated).
    lowering: "auto" (`conv_cpu.choose_plan`'s plan on the CPU backend, XLA's convolution on any
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
  plan = conv_cpu.choose_plan(x.shape, kernel.shape, stride) if how == "auto" else how
  return conv_cpu.conv_valid(x, kernel, stride, plan, bias)


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
  lowering: str | conv_cpu.Plan = "auto"

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
