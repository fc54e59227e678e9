"""The linear-probe and k-shot evaluators' classifiers on synthetic embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import evals
from mmjax.evals import fewshot
from mmjax.evals import linear_probe


def _clusters(n_per_class, classes=5, dim=16, spread=0.3, seed=0):
  """Unit-norm embeddings around one random direction per class, and their labels."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, dim))
  y = np.repeat(np.arange(classes), n_per_class)
  x = centres[y] + spread * rng.normal(size=(len(y), dim))
  order = rng.permutation(len(y))
  x, y = x[order], y[order]
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y.astype(np.int32)


@pytest.mark.slow  # Compiles an L-BFGS loop.
def test_logistic_regression_reaches_the_optimum():
  x, y = _clusters(60, spread=1.0, seed=1)  # The shapes of the next test: compiled once.
  p = linear_probe.fit_logistic(x, y, 1e-2, 5, 100, np.ones(len(x), np.float32))

  def loss(p):
    logits = x @ p["w"] + p["b"]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + 0.5 * 1e-2 * jnp.sum(p["w"] ** 2))

  grads = jax.grad(loss)(p)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-4
  assert loss(p) < loss(jax.tree.map(jnp.zeros_like, p))


def test_probe_separates_clusters_and_not_random_labels():
  train_x, train_y = _clusters(60, seed=1)
  test_x, test_y = _clusters(20, seed=1)  # The same centres (seed), fewer draws.
  out = linear_probe.probe(train_x, train_y, test_x, test_y, l2_grid=(1e-4, 1e-2), steps=100)
  assert out["top1"] > 0.95 and out["l2"] in (1e-4, 1e-2)
  shuffled = np.random.default_rng(0).permutation(train_y)
  chance = linear_probe.probe(train_x, shuffled, test_x, test_y, l2_grid=(1e-2,), steps=100)
  assert chance["top1"] < 0.5


def test_kshot_draws_k_per_class_and_improves_with_k():
  x, y = _clusters(50, spread=1.2, seed=2)
  idx = fewshot.sample_shots(y, 3, np.random.default_rng(0))
  assert len(set(idx)) == 15 and np.all(np.bincount(y[idx]) == 3)
  train_x, train_y, test_x, test_y = x[:200], y[:200], x[200:], y[200:]
  for method in ("prototype", "ridge"):
    acc = [fewshot.kshot_accuracy(train_x, train_y, test_x, test_y, k, seeds=10, method=method)
           for k in (1, 10)]
    assert acc[0] < acc[1] and acc[1] > 0.6 and acc[0] > 0.2, (method, acc)
  with pytest.raises(ValueError, match="fewer than k=100"):
    fewshot.sample_shots(y, 100, np.random.default_rng(0))


def test_registered():
  assert evals.EVALUATORS["linear_probe"] == "mmjax.evals.linear_probe:LinearProbe"
  assert evals.EVALUATORS["fewshot"] == "mmjax.evals.fewshot:FewShot"
