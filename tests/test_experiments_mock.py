"""Experiments' configs, tasks and evaluators end to end on synthetic data, in-process.

No prepared dataset is needed (as the Flax examples test on mock data): the data source
is replaced by 512 random 28x28 digits with labels, and the smoke config trains a few
steps on one device, checkpoints, and evaluates. Every experiment runs on the real MNIST
copy in the `slow` end-to-end tests (test_launch, test_clip_task, test_ldm,
test_vqa_tasks); the two here are the fast tier's.
"""
import importlib.util

import numpy as np
import pytest

from mmjax.data import sources
from mmjax import parallel
from mmjax import tasks
from mmjax.train import metrics as metrics_lib
from mmjax.train import trainer

import launch_helpers as lh


@pytest.fixture(autouse=True)
def synthetic_mnist(monkeypatch):
  rng = np.random.default_rng(0)
  arrays = {"image": rng.integers(0, 256, (512, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, 512).astype(np.int64)}

  def load_source(dataset_config, split):
    return sources.ArraySource(arrays)

  monkeypatch.setattr(sources, "load_source", load_source)


def _config(name, arg):
  spec = importlib.util.spec_from_file_location(name, lh.REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name, arg, key", [
    ("mnist_lenet", "smoke", "eval/accuracy"),
    pytest.param("clip_mnist", "smoke", "eval/zeroshot_top1", marks=pytest.mark.slow),
])
def test_experiment_on_synthetic_data(tmp_path, name, arg, key):
  config = _config(name, arg)
  config.num_train_steps, config.checkpoint_every_steps = 4, 2
  final = lh.train(None, config, tmp_path, 1)
  rows = lh.metrics(tmp_path)
  assert rows[-1]["step"] == config.num_train_steps
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert 0.0 <= final[key] <= 1.0
