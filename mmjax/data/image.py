"""Image operations on NumPy batches: normalisation, square crops, resizing.

Images are uint8 [batch, height, width, channels] as datasets store them; these run
on the host, inside the input pipeline's preprocessing.
"""
from typing import Callable

import numpy as np

from mmjax.data import seeded
from mmjax.data.sources import Batch

# Mean and standard deviation of the training pixels in [0, 1], per dataset.
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}

# OpenAI CLIP's pixel mean and std per RGB channel, in [0, 1]: what open_clip's
# weights expect (open_clip's OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalisation(dataset_name: str) -> tuple[float, float]:
  """(mean, std) of a dataset's pixels in [0, 1]; (0.5, 0.5) for one not listed."""
  return NORMALISATION.get(dataset_name, (0.5, 0.5))


def normalize(images: np.ndarray, mean, std, precision=np.float32) -> np.ndarray:
  """uint8 images [b, h, w, c] -> float32 (x / 255 - mean) / std, same shape.

  `mean` and `std` are scalars or one value per channel. They are cast to `precision`
  (np.float32, or np.float64 to keep Python floats' digits), the scale 1 / (255 std)
  and offset mean / std are computed in it and rounded to float32, and the result is
  x * scale - offset, in place on one new float32 array (the textbook expression makes
  three temporaries). The two agree to float32 rounding.
  """
  mean, std = np.asarray(mean, precision), np.asarray(std, precision)
  x = images.astype(np.float32)
  x *= (1.0 / (255.0 * std)).astype(np.float32)
  x -= (mean / std).astype(np.float32)
  return x


def image_classification_preprocess(mean: float, std: float) -> Callable[[Batch], Batch]:
  """uint8 images [b, h, w, c] -> `normalize`d (scale and offset from float64 mean and
  std); labels -> int32."""

  def preprocess(batch: Batch) -> Batch:
    return {"image": normalize(batch["image"], mean, std, np.float64),
            "label": batch["label"].astype(np.int32)}

  return preprocess


def crop_and_resize(images: np.ndarray, size: int, *, positions: np.ndarray | None = None,
                    seed: int = 0, min_fraction: float = 1.0,
                    channels: int | None = None) -> np.ndarray:
  """uint8 images [b, h, w, c] -> uint8 [b, size, size, channels]: a square crop, resized.

  Evaluation (`positions` None): the centred square of side min(h, w). Training: a
  square of side min(h, w) * f, f uniform in [min_fraction, 1], at a uniform place;
  f and the place are drawn from (seed, the example's stream position), so a resumed
  run crops exactly as the first did. Resized with PIL's bilinear filter (antialiased);
  a crop already `size` wide is not resampled. `channels=3` repeats a grey channel.
  """
  b, h, w, c = images.shape
  short = min(h, w)
  if positions is None:
    sides = np.full(b, short)
    tops, lefts = np.full(b, (h - short) // 2), np.full(b, (w - short) // 2)
  else:
    if not 0.0 < min_fraction <= 1.0:
      raise ValueError(f"min_fraction={min_fraction}: the smallest crop, as a fraction of "
                       f"the shorter side, must be in (0, 1].")
    u = [seeded.uniform(positions, seed * 4 + k) for k in range(3)]
    sides = np.maximum(1, np.round(short * (min_fraction + (1 - min_fraction) * u[0])))
    sides = sides.astype(np.int64)
    tops = np.floor(u[1] * (h - sides + 1)).astype(np.int64)
    lefts = np.floor(u[2] * (w - sides + 1)).astype(np.int64)
  if h == w == size and np.all(sides == size):
    out = images  # Nothing to crop or resample (a 28x28 dataset at size 28).
  else:
    out = _crop_each(images, sides, tops, lefts, size)
  if channels is not None and channels != c:
    if c != 1:
      raise ValueError(f"Images have {c} channels; the model takes {channels}. Only grey "
                       f"images (1 channel) are converted (repeated to {channels}).")
    out = np.repeat(out, channels, axis=-1)
  return out


def _crop_each(images, sides, tops, lefts, size: int) -> np.ndarray:
  """Each image's square crop (side, top, left), resized to size x size with PIL."""
  import PIL.Image  # pylint: disable=import-outside-toplevel
  b, _, _, c = images.shape
  out = np.empty((b, size, size, c), np.uint8)
  for i in range(b):
    crop = images[i, tops[i]:tops[i] + sides[i], lefts[i]:lefts[i] + sides[i]]
    if sides[i] != size:
      pil = PIL.Image.fromarray(crop[..., 0] if c == 1 else crop)
      crop = np.asarray(pil.resize((size, size), PIL.Image.BILINEAR)).reshape(size, size, c)
    out[i] = crop
  return out
