"""k-shot classification on frozen image embeddings: k training images per class, several
draws of them, the accuracy on a test split averaged over the draws."""
import numpy as np

from mmjax.evals import features
from mmjax.evals import retrieval
from mmjax.tasks import base


def sample_shots(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """Indices of k examples of every class present in `labels` [n] (ValueError if too few)."""
  out = []
  for c in np.unique(labels):
    pool = np.flatnonzero(labels == c)
    if len(pool) < k:
      raise ValueError(f"k-shot: class {c} has {len(pool)} training examples, fewer than "
                       f"k={k}.")
    out.append(rng.choice(pool, k, replace=False))
  return np.concatenate(out)


def prototype_classify(shots_x, shots_y, test_x) -> np.ndarray:
  """Nearest class mean by cosine (each class's mean of unit embeddings): test labels [m]."""
  classes = np.unique(shots_y)
  means = np.stack([retrieval.normalise(shots_x[shots_y == c]).mean(axis=0) for c in classes])
  return classes[np.argmax(retrieval.normalise(test_x) @ retrieval.normalise(means).T, axis=1)]


def ridge_classify(shots_x, shots_y, test_x, l2: float = 1.0) -> np.ndarray:
  """Closed-form ridge regression onto one-hot targets (big_vision's few-shot probe),
  on unit embeddings with a bias: test labels [m]."""
  classes = np.unique(shots_y)
  add_bias = lambda x: np.concatenate([retrieval.normalise(x), np.ones((len(x), 1))], axis=1)
  x = add_bias(shots_x).astype(np.float64)
  targets = (shots_y[:, None] == classes[None]).astype(np.float64) * 2 - 1
  w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ targets)
  return classes[np.argmax(add_bias(test_x) @ w, axis=1)]


def kshot_accuracy(train_x, train_y, test_x, test_y, k: int, seeds: int = 5,
                   method: str = "prototype", l2: float = 1.0) -> float:
  """Mean over `seeds` draws of k shots per class of the test accuracy."""
  classify = {"prototype": prototype_classify,
              "ridge": lambda a, b, c: ridge_classify(a, b, c, l2)}
  if method not in classify:
    raise ValueError(f"k-shot: method={method!r}: use 'prototype' or 'ridge'.")
  scores = []
  for seed in range(seeds):
    idx = sample_shots(train_y, k, np.random.default_rng(seed))
    scores.append(np.mean(classify[method](train_x[idx], train_y[idx], test_x) == test_y))
  return float(np.mean(scores))


class FewShot:
  """eval/{k}shot_top1 for each k of `shots`, each the mean over `seeds` draws.

  Embeds `train_split` (the shots are drawn from it) and `split` (scored) with the frozen
  model (`features.ImageEmbeddings`); classifies by the nearest class mean ("prototype",
  the default) or by ridge regression ("ridge", penalty `l2`).
  """

  def __init__(self, task: base.Embedder, split: str | None = None, train_split: str | None = None,
               batch_size: int | None = None, shots=(1, 5, 10), seeds: int = 5,
               method: str = "prototype", l2: float = 1.0):
    c = task.config
    self.embed = features.ImageEmbeddings(task, batch_size, "k-shot classification")
    self.split = split or c.dataset.eval_split
    self.train_split = train_split or c.dataset.train_split
    self.shots = tuple(int(k) for k in shots)
    if not self.shots or min(self.shots) < 1 or seeds < 1 or method not in ("prototype",
                                                                            "ridge"):
      raise ValueError(f"k-shot: shots={shots} (each >= 1), seeds={seeds} (>= 1), "
                       f"method={method!r} ('prototype' or 'ridge').")
    self.seeds, self.method, self.l2 = int(seeds), method, float(l2)

  def run(self, params, extras) -> dict[str, float]:
    train_x, train_y = self.embed(params, extras, self.train_split)
    test_x, test_y = self.embed(params, extras, self.split)
    return {f"eval/{k}shot_top1": kshot_accuracy(train_x, train_y, test_x, test_y, k,
                                                 self.seeds, self.method, self.l2)
            for k in self.shots}
