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
workdir's latest checkpoint. Each evaluator's `task` argument names the Protocol of
`mmjax/tasks/base.py` it needs (the task methods it calls); a task without them is an
error when the evaluator is built.
"""
import dataclasses
import inspect
import typing

from mmjax import registry

# config.evals.<name>.type -> "module:class", imported only when used.
EVALUATORS = {
    "classification": "mmjax.evals.classification:Classification",
    "zeroshot_retrieval": "mmjax.evals.zeroshot:ZeroShotRetrieval",
    "reconstruction": "mmjax.evals.reconstruction:Reconstruction",
    "sample_quality": "mmjax.evals.sample_quality:SampleQuality",
    "vqa": "mmjax.evals.vqa:VqaExactMatch",
    "itm": "mmjax.evals.itm:MatchingAndMasking",
    "linear_probe": "mmjax.evals.linear_probe:LinearProbe",
    "fewshot": "mmjax.evals.fewshot:FewShot",
}


@dataclasses.dataclass
class Scheduled:
  """An evaluator and its cadence."""
  name: str
  every_steps: int
  evaluator: object

  def due(self, step: int, is_last: bool) -> bool:
    return is_last or step % self.every_steps == 0


def _missing(task, protocol) -> list[str]:
  """The members of `protocol` (a `tasks.base` Protocol) that `task` lacks; [] for an
  evaluator whose `task` argument names no Protocol."""
  if not getattr(protocol, "_is_protocol", False):
    return []
  names = set()
  for klass in protocol.__mro__:
    if klass not in (object, typing.Protocol, typing.Generic):
      names |= {n for n in [*vars(klass), *getattr(klass, "__annotations__", {})]
                if not n.startswith("_")}
  return sorted(n for n in names if not hasattr(task, n))


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
    params = inspect.signature(cls).parameters
    missing = _missing(task, params["task"].annotation) if "task" in params else []
    if missing:
      raise ValueError(f"config.evals.{name}: a {kind!r} evaluator needs a task with "
                       f"{', '.join(missing)} "
                       f"(tasks.base.{params['task'].annotation.__name__}); "
                       f"{type(task).__name__} has none.")
    known = [p for p in params if p != "task"]
    unknown = sorted(set(fields) - set(known))
    if unknown:
      raise ValueError(f"config.evals.{name}: unknown field(s) {unknown} for a {kind!r} "
                       f"evaluator; it takes {known} (and type, every_steps).")
    out.append(Scheduled(name, every, cls(task, **fields)))
  return out
