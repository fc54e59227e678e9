"""Issue 29 (reliability, round two), items 1-5: recovery and run integrity.

In-process runs of the toy LinearTask (tests/test_trainer.py) where possible; launch.py
subprocesses where the one-line error or a signal is the point.
"""
import json
import math
import os
import re

import pytest

import launch_helpers as lh
from mmjax import parallel
from mmjax.train import checkpoints
from mmjax.train import guards
from mmjax.train import metrics as metrics_lib
from mmjax.train import trainer
from test_trainer import LinearTask, _config, _train


def _rows(workdir, name="metrics.jsonl"):
  return metrics_lib.read_jsonl(os.path.join(workdir, name))


def _eval_only(config, workdir):
  mesh = parallel.make_mesh()
  return trainer.evaluate_only(config, str(workdir), LinearTask(config, mesh), mesh)


def _spike_config(lr: float, **overrides):
  """SGD warming up to `lr`: 3.0 diverges once the warm-up passes ~0.5 and overflows
  to Inf at step 35; 0.05 converges."""
  config = _config(**{"num_train_steps": 60, "checkpoint_every_steps": 10, **overrides})
  config.optimizer.learning_rate = lr
  config.optimizer.warmup_steps = 10
  return config


# Item 1: a loss spike is recovered on the same workdir with an explicit opt-in.
def test_nan_stop_then_a_lower_learning_rate_resumes_from_the_finite_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"Stopped at step 35: .*the last checkpoint, "
                                               r"step 30 .*--config.resume_changes="):
    _train(_spike_config(3.0), tmp_path)
  original = (tmp_path / "config.json").read_bytes()
  lower = _spike_config(0.05)
  # Without the opt-in: refused, naming the opt-in; nothing written.
  with pytest.raises(guards.ConfigError, match=r"optimizer.learning_rate: 3.0 -> 0.05.*"
                                               r"--config.resume_changes=optimizer"
                                               r".learning_rate"):
    _train(lower, tmp_path)
  assert not list(tmp_path.glob("config.*.json"))
  lower.resume_changes = "optimizer.learning_rate"
  final = _train(lower, tmp_path)
  assert (tmp_path / "config.json").read_bytes() == original
  record = json.loads((tmp_path / "config.30.json").read_text())
  assert record["optimizer"]["learning_rate"] == 0.05
  assert record["resume_changes"] == "optimizer.learning_rate"
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 61))  # Steps 31-35 rewritten once.
  assert all(r["train/learning_rate"] == pytest.approx(0.05) for r in rows[30:])
  resumed = [r["train/loss"] for r in rows[30:]]
  assert all(math.isfinite(v) for v in resumed) and resumed[-1] < 1e-2 * resumed[0]
  assert final["train/loss"] == resumed[-1]
  assert lh.checkpoint_steps(tmp_path)[-1] == 60
  # A later restart compares with the config that wrote its checkpoint: the lower
  # rate needs no opt-in again, and going back to 3.0 does.
  again = _spike_config(3.0, num_train_steps=70, allow_schedule_change=True)
  with pytest.raises(guards.ConfigError, match=r"learning_rate: 0.05 -> 3.0"):
    _train(again, tmp_path)
  _train(_spike_config(0.05, num_train_steps=70, allow_schedule_change=True), tmp_path)
  assert [r["step"] for r in _rows(tmp_path)] == list(range(1, 71))


def test_resume_changes_are_only_for_fields_that_keep_the_shapes(tmp_path):
  _train(_config(num_train_steps=5), tmp_path)
  changed = _config(num_train_steps=5, global_batch_size=32,
                    resume_changes="global_batch_size")
  with pytest.raises(guards.ConfigError, match=r"config.resume_changes names "
                                               r"global_batch_size: only optimizer"):
    _train(changed, tmp_path)
  # The other fields changed with a resumable one: the hint says what may change.
  mixed = _config(num_train_steps=6, seed=3, allow_schedule_change=True)
  mixed.optimizer.learning_rate = 0.01
  with pytest.raises(guards.ConfigError, match=r"seed: 0 -> 3.*\(only optimizer.learning_"
                                               r"rate, .* may change, with --config."
                                               r"resume_changes\)"):
    _train(mixed, tmp_path)
  # Turning clipping on changes the optimizer state's layout: refused.
  clip = _config(num_train_steps=6, allow_schedule_change=True,
                 resume_changes="optimizer.grad_clip_norm")
  clip.optimizer.grad_clip_norm = 1.0
  with pytest.raises(guards.ConfigError, match=r"grad_clip_norm: 0.0 -> 1.0 turns clipping "
                                               r"on"):
    _train(clip, tmp_path)
  assert lh.checkpoint_steps(tmp_path) == [5] and not list(tmp_path.glob("config.*.json"))
