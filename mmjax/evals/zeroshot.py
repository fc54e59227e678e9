"""Zero-shot classification and cross-modal retrieval of a joint embedding model."""
import functools

import jax
import numpy as np

from mmjax.data import sources
from mmjax.evals import common
from mmjax.evals import retrieval
from mmjax import parallel
from mmjax.tasks import base


class ZeroShotRetrieval:
  """eval/zeroshot_top1 and eval/{i2t,t2i}_recall@{1,5,10} over a whole split.

  Needs a `tasks.base.Embedder`: `task.embed` on batches of `task.eval_preprocess`, and
  `task.class_text_embeddings`, None when the task has no classes (then there is no
  eval/zeroshot_top1). An item is relevant to a query when their labels are equal (see
  `retrieval.recall_at_k`): a task whose captions are the data's gives each example its
  own label (its index).
  """

  def __init__(self, task: base.Embedder, split: str | None = None,
               batch_size: int | None = None):
    c = task.config
    self.task = task
    self.batch_size = common.check_eval_batch(batch_size or c.eval_batch_size, task.mesh)
    self.source = sources.load_source(c.dataset, split or c.dataset.eval_split)
    self._embed = jax.jit(self._embed_batch,
                          out_shardings=parallel.replicated(task.mesh))

  def _embed_batch(self, params, extras, batch):
    image_emb, text_emb = self.task.embed(params, extras, batch)
    return image_emb, text_emb, batch["label"], batch["mask"]

  def run(self, params, extras) -> dict[str, float]:
    dataset = common.eval_batches(self.source, self.batch_size, self.task.eval_preprocess)
    embed = functools.partial(self._embed, params, extras)
    images, texts, labels = [], [], []
    for batch in common.global_batches(dataset, self.task.mesh):
      image_emb, text_emb, label, mask = map(np.asarray, embed(batch))
      images.append(image_emb[mask > 0])
      texts.append(text_emb[mask > 0])
      labels.append(label[mask > 0])
    images, texts, labels = map(np.concatenate, (images, texts, labels))

    metrics = {}
    class_text = self.task.class_text_embeddings(params, extras)
    if class_text is not None:
      class_emb = retrieval.class_embeddings(class_text)
      metrics["eval/zeroshot_top1"] = retrieval.zeroshot_top1(images, class_emb, labels)
    for name, (q, items) in {"i2t": (images, texts), "t2i": (texts, images)}.items():
      for k, r in retrieval.recall_at_k(q, items, labels, labels).items():
        metrics[f"eval/{name}_recall@{k}"] = r
    return metrics
