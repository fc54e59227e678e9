"""Zero-shot classification and cross-modal retrieval from embeddings (NumPy, host side)."""
import numpy as np


def normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def class_embeddings(text_emb: np.ndarray) -> np.ndarray:
  """[classes, templates, dim] text embeddings -> [classes, dim]: mean over templates, L2-normalised."""
  return normalise(normalise(text_emb).mean(axis=1))


def zeroshot_top1(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of the nearest class embedding.

  Args:
    image_emb: [n, dim]. class_emb: [classes, dim]. labels: [n] ints.
  """
  return float(np.mean(np.argmax(image_emb @ class_emb.T, axis=1) == labels))


def recall_at_k(query_emb: np.ndarray, item_emb: np.ndarray, query_labels: np.ndarray,
                item_labels: np.ndarray, ks=(1, 5, 10), chunk: int = 1024) -> dict[int, float]:
  """Fraction of queries with a relevant item among their k nearest (cosine).

  An item is relevant to a query when their labels are equal: on a classification
  dataset every image of a class matches that class's captions, and no ranking can
  tell them apart.

  Args:
    query_emb: [n, dim]. item_emb: [m, dim]. query_labels: [n]. item_labels: [m].
  """
  kmax = max(ks)
  hits = {k: 0 for k in ks}
  for start in range(0, len(query_emb), chunk):
    sim = query_emb[start:start + chunk] @ item_emb.T  # [chunk, m]
    top = np.argpartition(-sim, kmax - 1, axis=1)[:, :kmax]
    order = np.take_along_axis(sim, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)  # [chunk, kmax], nearest first.
    relevant = item_labels[top] == query_labels[start:start + chunk, None]
    for k in ks:
      hits[k] += int(relevant[:, :k].any(axis=1).sum())
  return {k: hits[k] / len(query_emb) for k in ks}
