"""Classification: loss and top-1 accuracy over a whole split."""
import functools

import jax
import jax.numpy as jnp

from mmjax import losses
from mmjax.data import sources
from mmjax.evals import common
from mmjax import losses
from mmjax.tasks import base


class Classification:
  """eval/loss and eval/accuracy of `task.logits` on every example of `split`.

  Needs a `tasks.base.Classifier`: `task.logits` on batches of `task.eval_preprocess`.
  """

  def __init__(self, task: base.Classifier, split: str | None = None,
               batch_size: int | None = None):
    c = task.config
    self.task = task
    self.batch_size = common.check_eval_batch(batch_size or c.eval_batch_size, task.mesh)
    self.source = sources.load_source(c.dataset, split or c.dataset.eval_split)
    self._sums = jax.jit(self._batch_sums)

  def _batch_sums(self, params, extras, batch):
    logits = self.task.logits(params, extras, batch["image"])
    mask = batch["mask"]
    return {"loss": jnp.sum(losses.softmax_cross_entropy(logits, batch["label"]) * mask),
            "accuracy": jnp.sum(losses.top1_correct(logits, batch["label"]) * mask),
            "count": jnp.sum(mask)}

  def run(self, params, extras) -> dict[str, float]:
    dataset = common.eval_batches(self.source, self.batch_size, self.task.eval_preprocess)
    totals = common.sum_over_batches(functools.partial(self._sums, params, extras), dataset,
                                     self.task.mesh)
    return common.means(totals)
