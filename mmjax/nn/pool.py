"""Max and average pooling with the conventions of `conv2d` (padding, stride)."""
import jax
import jax.numpy as jnp

from mmjax.nn.conv import Padding, explicit_padding, pad2d
from mmjax.nn.window import conv_output_size, pair, windows


def _geometry(x, window, stride, padding, fn: str):
  """Checks the shapes and static arguments of a pooling `fn` -> (window, stride, pads).

  Integers may be Python or NumPy ones; anything wrong is a ValueError naming `fn`.
  """
  if jnp.ndim(x) != 4:
    raise ValueError(f"{fn}: x must be [batch, height, width, channels], got shape "
                     f"{jnp.shape(x)}.")
  window = pair(window, "window", fn=fn)
  stride = window if stride is None else pair(stride, "stride", fn=fn)
  pads = explicit_padding(padding, x.shape[1:3], window, stride, fn=fn)
  padded = [n + p0 + p1 for n, (p0, p1) in zip(x.shape[1:3], pads)]
  if any(conv_output_size(n, k, s) < 1 for n, k, s in zip(padded, window, stride)):
    raise ValueError(f"{fn}: window {window} is larger than the padded input "
                     f"{tuple(padded)}; use a smaller window or more padding.")
  return window, stride, pads


def _tiles(x, window, stride, pads):
  """Non-overlapping unpadded windows as [b, out_h, kh, out_w, kw, c], else None.

  Then pooling is a reshape and a reduction, fast forwards and backwards.
  """
  if stride != window or pads != ((0, 0), (0, 0)):
    return None
  b, h, w, c = x.shape
  oh, ow = h // window[0], w // window[1]
  if oh < 1 or ow < 1:
    raise ValueError(f"Window {window} is larger than the padded input {(h, w)}.")
  x = x[:, :oh * window[0], :ow * window[1]]
  return x.reshape(b, oh, window[0], ow, window[1], c)


def max_pool(x: jax.Array, window, stride=None, padding: Padding = "VALID") -> jax.Array:
  """Maximum over each window; padded positions never win (they are -inf).

  Args:
    x: [batch, height, width, channels].
    window: int or (kh, kw), each >= 1. stride: the same, or None for the window.
    padding: "VALID", "SAME", an int p >= 0, or ((top, bottom), (left, right)).
    Integers may be Python or NumPy ones.

  Returns:
    [batch, out_h, out_w, channels], out = floor((in - k + pad_total) / s) + 1.

  Raises:
    ValueError, starting "max_pool:", for a wrong shape or argument (checked on the
    shape and static values while tracing).
  """
  window, stride, pads = _geometry(x, window, stride, padding, "max_pool")
  if (tiles := _tiles(x, window, stride, pads)) is not None:
    return tiles.max(axis=(2, 4))
  views = windows(pad2d(x, pads, value=-jnp.inf), window, stride)
  out = views[0]
  for v in views[1:]:
    out = jnp.maximum(out, v)
  return out


def avg_pool(x: jax.Array, window, stride=None, padding: Padding = "VALID",
             count_include_pad: bool = True) -> jax.Array:
  """Mean over each window, of zero-padded input.

  With `count_include_pad` (the default, as in PyTorch and Flax) every window is
  divided by kh*kw, padding included; otherwise by the number of real pixels in it.
  Low-precision floats (bfloat16, float16) are summed in float32 and the mean cast back;
  integers give the default float dtype. Shapes, arguments and errors as in `max_pool`
  (the errors start "avg_pool:").
  """
  window, stride, pads = _geometry(x, window, stride, padding, "avg_pool")
  x = jnp.asarray(x)
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.result_type(float)
  x = x.astype(jnp.promote_types(dtype, jnp.float32))  # bfloat16 sums in float32.
  if (tiles := _tiles(x, window, stride, pads)) is not None:
    return tiles.mean(axis=(2, 4)).astype(dtype)
  total = sum(windows(pad2d(x, pads), window, stride))
  if count_include_pad:
    return (total / (window[0] * window[1])).astype(dtype)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  counts = sum(windows(pad2d(ones, pads), window, stride))
  return (total / counts).astype(dtype)
