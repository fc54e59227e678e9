"""Image-text matching and masked-token prediction of a single-stream encoder."""
import functools

import jax.numpy as jnp
import jax
import optax

from mmjax.data import sources
from mmjax.data import vqa
from mmjax.evals import common
from mmjax.tasks import base


class MatchingAndMasking:
  """eval/itm_accuracy, eval/itm_loss and eval/mlm_accuracy on `num_grids` fixed grids
  of the eval split.

  Needs a `tasks.base.Predictor`: `task.predict` on batches of `task.eval_preprocess`.
  """

  def __init__(self, task: base.Predictor, num_grids: int = 2000,
               batch_size: int | None = None):
    c = task.config
    self.task = task
    self.batch_size = common.check_eval_batch(batch_size or c.eval_batch_size, task.mesh)
    self.source = vqa.GridSource(sources.load_source(c.dataset, c.dataset.eval_split),
                                 num_grids, seed=vqa.EVAL_GRID_SEED)
    self._sums = jax.jit(self._batch_sums)

  def _batch_sums(self, params, extras, batch):
    mask = batch["mask"]
    logit = self.task.predict(params, extras, batch["image"], batch["tokens"])["itm_logit"]
    itm_correct = ((logit > 0) == (batch["match"] > 0)).astype(jnp.float32)
    itm = optax.sigmoid_binary_cross_entropy(logit, batch["match"])
    mlm_logits = self.task.predict(params, extras, batch["image"],
                                   batch["mlm_tokens"])["mlm_logits"]
    mlm_w = batch["mlm_weight"] * mask[:, None]
    mlm_correct = (jnp.argmax(mlm_logits, -1) == batch["targets"]).astype(jnp.float32)
    return {"itm_correct": jnp.sum(itm_correct * mask), "itm_loss": jnp.sum(itm * mask),
            "count": jnp.sum(mask), "mlm_correct": jnp.sum(mlm_correct * mlm_w),
            "mlm_count": jnp.sum(mlm_w)}

  def run(self, params, extras) -> dict[str, float]:
    dataset = common.eval_batches(self.source, self.batch_size, self.task.eval_preprocess)
    t = common.sum_over_batches(functools.partial(self._sums, params, extras), dataset,
                                self.task.mesh)
    return {"eval/itm_accuracy": t["itm_correct"] / t["count"],
            "eval/itm_loss": t["itm_loss"] / t["count"],
            "eval/mlm_accuracy": t["mlm_correct"] / max(t["mlm_count"], 1.0)}
