"""Sliding-window arithmetic shared by convolution and pooling: integer arguments,
the output-size rule and the strided views of a padded input."""
import operator

import jax
import numpy as np


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
