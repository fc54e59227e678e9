"""Captions for image-classification datasets: class names through templates.

Training captions use `TRAIN_TEMPLATES`, a random one per example (seeded by the
example's stream position, so a resumed run draws the same ones). Evaluation uses
the disjoint `EVAL_TEMPLATES`, never seen in training.
"""
import numpy as np

CLASS_NAMES = {
    "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "fashion_mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"),
}

TRAIN_TEMPLATES = {
    "mnist": (
        "a handwritten digit {}",
        "the number {}",
        "a photo of the digit {}",
        "a drawing of a {}",
        "the numeral {}",
        "a scanned {}",
        "a {} written by hand",
        "a picture of a {}",
        "handwriting of a {}",
        "a small gray {}",
        "digit: {}",
        "a messy {}",
    ),
    "fashion_mnist": (
        "a photo of a {}",
        "a product photo of a {}",
        "a {} on a plain background",
        "a picture of a {}",
        "a gray photo of a {}",
        "a small image of a {}",
        "a {} for sale",
        "clothing: {}",
        "a catalog image of a {}",
        "a low resolution {}",
        "someone's {}",
        "a centered {}",
    ),
}

EVAL_TEMPLATES = {
    "mnist": ("an image of a {}", "this is a {}", "a {}", "a photo of a {}"),
    "fashion_mnist": ("an image of a {}", "this is a {}", "a {}", "a photo of the {}"),
}


def _mix(x: np.ndarray, seed: int) -> np.ndarray:
  """A vectorised 64-bit hash (splitmix64 finaliser) of integers with a seed."""
  with np.errstate(over="ignore"):  # Multiplication modulo 2**64 is the point.
    z = x.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def template_choice(positions: np.ndarray, num_templates: int, seed: int) -> np.ndarray:
  """[batch] stream positions -> [batch] template ids, pseudo-random and reproducible."""
  return (_mix(positions, seed) % np.uint64(num_templates)).astype(np.int64)


def position_uniform(positions: np.ndarray, seed: int) -> np.ndarray:
  """[batch] stream positions -> [batch] floats in [0, 1), pseudo-random and reproducible.

  For per-example coin flips that a resumed run repeats exactly (e.g. dropping the
  caption for classifier-free guidance).
  """
  return (_mix(positions, seed) >> np.uint64(11)).astype(np.float64) / float(2**53)


def captions(dataset: str, labels: np.ndarray, template_ids: np.ndarray,
             templates: tuple[str, ...]) -> list[str]:
  """[batch] labels and template ids -> the caption strings."""
  names = CLASS_NAMES[dataset]
  return [templates[t].format(names[y]) for y, t in zip(labels.tolist(), template_ids.tolist())]


def check_dataset(dataset: str):
  if dataset not in CLASS_NAMES:
    raise ValueError(f"No class names for dataset {dataset!r}; captions exist for "
                     f"{sorted(CLASS_NAMES)}. Add its names and templates to "
                     f"mmjax/data/captions.py.")
