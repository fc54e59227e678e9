"""Visual question answering: exact match of greedy answers, overall and per kind."""
import functools

import jax
import numpy as np

from mmjax.data import sources
from mmjax.data import vqa
from mmjax.evals import common
from mmjax import parallel
from mmjax.tasks import base


class VqaExactMatch:
  """eval/vqa_exact_match and eval/vqa_exact_match/{cell,count,presence} on `num_grids`
  fixed grids of the eval split (one question each, kinds in turn).

  Needs a `tasks.base.Generator`: `task.generate` on batches of `task.eval_preprocess`.
  """

  def __init__(self, task: base.Generator, num_grids: int = 1500,
               batch_size: int | None = None):
    c = task.config
    self.task = task
    self.batch_size = common.check_eval_batch(batch_size or c.eval_batch_size, task.mesh)
    self.source = vqa.GridSource(sources.load_source(c.dataset, c.dataset.eval_split),
                                 num_grids, seed=vqa.EVAL_GRID_SEED)
    self._generate = jax.jit(self._generate_batch,
                             out_shardings=parallel.replicated(task.mesh))

  def _generate_batch(self, params, extras, batch):
    answers = self.task.generate(params, extras, batch["image"], batch["prompt"])
    return answers, batch["answer"], batch["kind"], batch["mask"]

  def run(self, params, extras) -> dict[str, float]:
    dataset = common.eval_batches(self.source, self.batch_size, self.task.eval_preprocess)
    generate = functools.partial(self._generate, params, extras)
    correct, kinds = [], []
    for batch in common.global_batches(dataset, self.task.mesh):
      predicted, truth, kind, mask = map(np.asarray, generate(batch))
      keep = mask > 0
      same = [p == t for p, t in zip(vqa.decode_answers(predicted[keep]),
                                     vqa.decode_answers(truth[keep]))]
      correct.append(np.asarray(same, np.float64))
      kinds.append(kind[keep])
    correct, kinds = np.concatenate(correct), np.concatenate(kinds)
    metrics = {"eval/vqa_exact_match": float(np.mean(correct))}
    for i, name in enumerate(vqa.KINDS):
      if np.any(kinds == i):
        metrics[f"eval/vqa_exact_match/{name}"] = float(np.mean(correct[kinds == i]))
    return metrics
