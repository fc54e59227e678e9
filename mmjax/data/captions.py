"""Captions for image-classification datasets: class names through templates.

Training captions use `TRAIN_TEMPLATES`, a random one per example (`seeded.choice` of
the example's stream position, so a resumed run draws the same ones). Evaluation uses
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
