"""Evaluation: evaluators declared in the config, and the helpers they are built from.

An evaluator is a small object built once per run from the task it evaluates,

  evaluator = Class(task, **fields)          # opens its data, checks its batch size
  evaluator.run(params, extras) -> {"eval/...": float, "<name>": uint8 [n, h, w, c]}

and declared in the config, each with its own cadence (as big_vision declares them):

  config.evals.accuracy = dict(type="classification", every_steps=938)

`type` is a name below or, for an evaluator of your own, "package.module:Class".
`every_steps` defaults to `config.eval_every_steps`; the other fields go to the
evaluator (`split`, `batch_size`, ...). The trainer runs each evaluator every
`every_steps` and at the last step; `launch.py --eval_only` runs them all on a
workdir's latest checkpoint. Each evaluator documents the task methods it calls.
"""
import dataclasses
import inspect

from mmjax import registry

# config.evals.<name>.type -> "module:class", imported only when used.
EVALUATORS = {
    "classification": "mmjax.evals.classification:Classification",
    "zeroshot_retrieval": "mmjax.evals.zeroshot:ZeroShotRetrieval",
    "reconstruction": "mmjax.evals.reconstruction:Reconstruction",
    "sample_quality": "mmjax.evals.sample_quality:SampleQuality",
    "vqa": "mmjax.evals.vqa:VqaExactMatch",
    "itm": "mmjax.evals.itm:MatchingAndMasking",
}


@dataclasses.dataclass
class Scheduled:
  """An evaluator and its cadence."""
  name: str
  every_steps: int
  evaluator: object

  def due(self, step: int, is_last: bool) -> bool:
    return is_last or step % self.every_steps == 0


def build(config, task) -> list[Scheduled]:
  """The evaluators of `config.evals`, built for `task` (after `task.setup()`)."""
  out = []
  for name, fields in (config.get("evals") or {}).items():
    fields = dict(fields)
    kind = fields.pop("type", None)
    cls = registry.lookup(EVALUATORS, kind, f"evals.{name}.type", "evaluators", own=True)
    every = fields.pop("every_steps", None)
    every = int(config.eval_every_steps if every is None else every)
    if every < 1:
      raise ValueError(f"config.evals.{name}.every_steps={every}: must be >= 1.")
    known = [p for p in inspect.signature(cls).parameters if p != "task"]
    unknown = sorted(set(fields) - set(known))
    if unknown:
      raise ValueError(f"config.evals.{name}: unknown field(s) {unknown} for a {kind!r} "
                       f"evaluator; it takes {known} (and type, every_steps).")
    out.append(Scheduled(name, every, cls(task, **fields)))
  return out
