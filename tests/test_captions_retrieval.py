"""Caption templates and the retrieval / zero-shot metrics."""
import numpy as np

from mmjax.data import captions
from mmjax.evals import retrieval


def test_templates_are_many_and_held_out_ones_are_disjoint():
  for name in captions.CLASS_NAMES:
    assert len(captions.TRAIN_TEMPLATES[name]) >= 10
    assert not set(captions.TRAIN_TEMPLATES[name]) & set(captions.EVAL_TEMPLATES[name])
    assert len(captions.CLASS_NAMES[name]) == 10


def test_captions_text():
  texts = captions.captions("mnist", np.array([7, 0]), np.array([0, 1]),
                            captions.TRAIN_TEMPLATES["mnist"])
  assert texts == ["a handwritten digit seven", "the number zero"]


def test_recall_at_k_matches_brute_force():
  rng = np.random.default_rng(0)
  q, it = retrieval.normalise(rng.normal(size=(50, 8))), retrieval.normalise(rng.normal(size=(70, 8)))
  ql, il = rng.integers(0, 5, 50), rng.integers(0, 5, 70)
  got = retrieval.recall_at_k(q, it, ql, il, ks=(1, 3), chunk=16)
  order = np.argsort(-(q @ it.T), axis=1)
  for k in (1, 3):
    assert got[k] == np.mean([(il[order[i, :k]] == ql[i]).any() for i in range(50)])


def test_zeroshot_top1_on_separable_embeddings():
  class_emb = np.eye(3)
  texts = np.stack([np.eye(3) + 0.1 * np.random.default_rng(0).normal(size=(3, 3))
                    for _ in range(4)], axis=1)  # [classes, templates, dim]
  images = np.array([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.1, 1.0, 0.0]])
  emb = retrieval.class_embeddings(texts)
  assert emb.shape == (3, 3)
  assert retrieval.zeroshot_top1(images, emb, np.array([0, 2, 1])) == 1.0
  assert retrieval.zeroshot_top1(images, class_emb, np.array([0, 1, 1])) == 2 / 3
