"""Frozen image embeddings of a whole split, for the evaluators that fit a classifier on them."""
import functools

import jax
import numpy as np

from mmjax.data import sources
from mmjax.evals import common
from mmjax import parallel


class ImageEmbeddings:
  """Embeds every image of a split: `(params, extras, split) -> (emb [n, d], labels [n])`.

  Calls `task.embed(params, extras, batch)` (its first output, the image embeddings) on
  batches made by `task.eval_preprocess` ("image", "label"); the same on every process.
  Raises ValueError for a task whose labels are not classes (captions from the data).
  """

  def __init__(self, task, batch_size: int | None = None, what: str = "this evaluator"):
    if getattr(task, "class_names", None) == ():
      raise ValueError(f"{what} needs class labels, and this task's labels are example ids "
                       f"(config.captions='data'); use a classification dataset's labels "
                       f"(config.captions='templates').")
    self.task = task
    self.batch_size = common.check_eval_batch(batch_size or task.config.eval_batch_size,
                                              task.mesh)
    self._embed = jax.jit(self._embed_batch, out_shardings=parallel.replicated(task.mesh))
    self._sources = {}

  def _embed_batch(self, params, extras, batch):
    return self.task.embed(params, extras, batch)[0], batch["label"], batch["mask"]

  def source(self, split: str):
    if split not in self._sources:
      self._sources[split] = sources.load_source(self.task.config.dataset, split)
    return self._sources[split]

  def __call__(self, params, extras, split: str) -> tuple[np.ndarray, np.ndarray]:
    dataset = common.eval_batches(self.source(split), self.batch_size, self.task.eval_preprocess)
    embed = functools.partial(self._embed, params, extras)
    embs, labels = [], []
    for batch in common.global_batches(dataset, self.task.mesh):
      emb, label, mask = map(np.asarray, embed(batch))
      embs.append(emb[mask > 0])
      labels.append(label[mask > 0])
    return np.concatenate(embs).astype(np.float32), np.concatenate(labels).astype(np.int32)
