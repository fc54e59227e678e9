"""Input checks shared by the models."""
import jax


def check_image_shape(x: jax.Array, expected: tuple[int, ...], model: str):
  """Raises a ValueError naming the expected [batch, h, w, c] shape and the one received."""
  if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
    want = ", ".join(["batch", *map(str, expected)])
    raise ValueError(f"{model} expects images of shape [{want}], got {list(x.shape)}.")
