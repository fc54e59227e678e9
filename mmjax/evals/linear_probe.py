"""Linear probe: logistic regression on frozen image embeddings, trained on one split and
scored on another, the measure of an image encoder that CLIP's paper reports."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.evals import features
from mmjax.tasks import base


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_logistic(x: jax.Array, y: jax.Array, l2: float, num_classes: int,
                 steps: int = 300, weights: jax.Array | None = None) -> dict:
  """Multinomial logistic regression by full-batch L-BFGS (optax.lbfgs), `steps` steps.

  Minimises the (weighted) mean cross-entropy + l2 / 2 * |w|² (the bias is not penalised).

  Args:
    x: float [n, d] features. y: int [n] labels in [0, num_classes). l2: the penalty.
    weights: float [n], each example's weight (0: left out; default all 1), so that a
      held-out part needs no other shape, nor another compilation.

  Returns:
    {"w": [d, num_classes], "b": [num_classes]}: logits = x @ w + b.
  """
  x = x.astype(jnp.float32)
  weights = jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights

  def loss(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    ce = jnp.sum(weights * ce) / jnp.sum(weights)
    return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(_, carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), state

  p = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
       "b": jnp.zeros((num_classes,), jnp.float32)}
  return jax.lax.fori_loop(0, steps, step, (p, opt.init(p)))[0]


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Each array centred and scaled by the train features' mean and std (per dimension)."""
  mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
  return [(a - mean) / std for a in (train, *others)]


def accuracy(p: dict, x: np.ndarray, y: np.ndarray) -> float:
  """Top-1 accuracy of logits x @ w + b against labels y [n]."""
  return float(np.mean(np.argmax(x @ np.asarray(p["w"]) + np.asarray(p["b"]), axis=1) == y))


def probe(train_x, train_y, test_x, test_y, l2_grid=(1e-5, 1e-4, 1e-3, 1e-2),
          holdout: float = 0.1, steps: int = 300, seed: int = 0) -> dict[str, float]:
  """Fits the probe on train, scores it on test -> {"top1", "l2"}.

  With several values in `l2_grid`, each is fitted on train less a random `holdout`
  fraction and scored on that fraction; the best (the smallest l2 among ties) is fitted
  again on the whole train split. Features are standardised with train's statistics.
  """
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  train_x, test_x = standardise(train_x, test_x)
  l2 = float(l2_grid[0])
  if len(l2_grid) > 1:
    order = np.random.default_rng(seed).permutation(len(train_x))
    n_val = max(1, int(round(holdout * len(train_x))))
    val = order[:n_val]
    fit = np.ones(len(train_x), np.float32)
    fit[val] = 0.0
    scores = [accuracy(fit_logistic(train_x, train_y, float(c), num_classes, steps, fit),
                       train_x[val], train_y[val]) for c in l2_grid]
    l2 = float(l2_grid[int(np.argmax(scores))])
  p = fit_logistic(train_x, train_y, l2, num_classes, steps, np.ones(len(train_x), np.float32))
  return {"top1": accuracy(p, test_x, test_y), "l2": l2}


class LinearProbe:
  """eval/linear_probe_top1 (and eval/linear_probe_l2, the penalty chosen).

  Embeds `train_split` and `split` (default: the dataset's train and eval splits) with
  the frozen model (`features.ImageEmbeddings`: `task.embed`'s image embeddings on
  `task.eval_preprocess`'s batches), fits `probe` on the first and scores the second.
  """

  def __init__(self, task: base.Embedder, split: str | None = None, train_split: str | None = None,
               batch_size: int | None = None, l2_grid=(1e-5, 1e-4, 1e-3, 1e-2),
               steps: int = 300):
    c = task.config
    self.embed = features.ImageEmbeddings(task, batch_size, "The linear probe")
    self.split = split or c.dataset.eval_split
    self.train_split = train_split or c.dataset.train_split
    self.l2_grid = tuple(float(v) for v in l2_grid)
    self.steps = int(steps)
    if not self.l2_grid or min(self.l2_grid) < 0 or self.steps < 1:
      raise ValueError(f"linear probe: l2_grid={l2_grid} needs values >= 0, steps={steps} "
                       ">= 1.")

  def run(self, params, extras) -> dict[str, float]:
    train_x, train_y = self.embed(params, extras, self.train_split)
    test_x, test_y = self.embed(params, extras, self.split)
    out = probe(train_x, train_y, test_x, test_y, self.l2_grid, steps=self.steps)
    return {"eval/linear_probe_top1": out["top1"], "eval/linear_probe_l2": out["l2"]}
