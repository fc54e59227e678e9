"""The layering of mmjax, read from the imports of every module (`ast`, nothing run), and
the task-evaluator contract of every experiment."""
import ast
import importlib
import inspect
import pathlib

import pytest

from mmjax import evals
from mmjax import parallel
from mmjax import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at any depth (`from a.b import c` gives a.b and a.b.c)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return found


def _importers_of(prefix: str) -> set[str]:
  """The repository's Python files (relative paths) that import `prefix` or below."""
  out = set()
  paths = [REPO / "launch.py"] + [p for d in ("mmjax", "benchmarks", "experiments", "tests",
                                                "tools") for p in (REPO / d).rglob("*.py")]
  for path in paths:
    rel = path.relative_to(REPO)
    if any(m == prefix or m.startswith(prefix + ".") for m in _imports(path)):
      out.add(rel.as_posix())
  return out


def test_tasks_and_evaluators_do_not_import_the_trainer():
  users = _importers_of("mmjax.train")
  assert not {u for u in users if u.startswith(("mmjax/tasks/", "mmjax/evals/"))}, users


def test_train_is_imported_only_by_itself_the_launcher_benchmarks_and_tests():
  users = _importers_of("mmjax.train")
  allowed = ("mmjax/train/", "benchmarks/", "tests/")
  assert {u for u in users if not u.startswith(allowed)} == {"mmjax/launch.py"}, users


def test_the_interface_imports_no_model_or_format():
  imported = _imports(REPO / "mmjax" / "tasks" / "base.py")
  for heavy in ("mmjax.data.vqa", "mmjax.models", "mmjax.interop", "mmjax.train"):
    assert not any(m == heavy or m.startswith(heavy + ".") for m in imported), heavy


def _experiment_configs():
  for path in sorted((REPO / "experiments").glob("*.py")):
    if path.stem != "__init__":
      yield path.stem


@pytest.mark.parametrize("name", list(_experiment_configs()))
def test_every_experiments_task_offers_what_its_evaluators_need(name):
  """Each evaluator's `task` argument names a tasks.base Protocol; the experiment's task
  has every member of it (checked without setting the task up)."""
  config = importlib.import_module(f"experiments.{name}").get_config("smoke")
  if name == "sd_finetune":  # It needs a pipeline folder: the tiny fixture.
    config.init_from = str(REPO / "tests/fixtures/sd_tiny/sd1_ddim")
  task = tasks.get_task(config, parallel.make_mesh())
  assert config.evals, name
  for eval_name, fields in config.evals.items():
    cls = importlib.import_module(evals.EVALUATORS[fields["type"]].split(":")[0])
    cls = getattr(cls, evals.EVALUATORS[fields["type"]].split(":")[1])
    protocol = inspect.signature(cls).parameters["task"].annotation
    assert getattr(protocol, "_is_protocol", False), (cls, protocol)
    assert evals._missing(task, protocol) == [], (name, eval_name)
    assert isinstance(task, protocol), (name, eval_name)


def test_an_evaluator_on_a_task_without_its_methods_is_one_error():
  from mmjax import configs  # pylint: disable=import-outside-toplevel
  from mmjax.tasks import base  # pylint: disable=import-outside-toplevel

  class Bare(base.Task):
    """A task that offers the trainer's members only."""

  config = configs.base_config()
  config.evals = {"acc": {"type": "classification"}}
  task = Bare(config, parallel.make_mesh())
  assert not isinstance(task, base.Classifier)
  with pytest.raises(ValueError, match=r"config.evals.acc: a 'classification' evaluator "
                                       r"needs a task with eval_preprocess, logits "
                                       r"\(tasks.base.Classifier\); Bare has none."):
    evals.build(config, task)
