"""Issue 29 (reliability, round two), items 1-5: recovery and run integrity.

In-process runs of the toy LinearTask (tests/test_trainer.py) where possible; launch.py
subprocesses where the one-line error or a signal is the point.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import launch_helpers as lh
from mmjax import parallel
from mmjax.train import checkpoints
from mmjax.train import guards
from mmjax.train import memory
from mmjax.train import metrics as metrics_lib
from mmjax.train import trainer
from test_trainer import LinearTask, _config


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
    lh.train(LinearTask, _spike_config(3.0), tmp_path)
  original = (tmp_path / "config.json").read_bytes()
  lower = _spike_config(0.05)
  # Without the opt-in: refused, naming the opt-in; nothing written.
  with pytest.raises(guards.ConfigError, match=r"optimizer.learning_rate: 3.0 -> 0.05.*"
                                               r"--config.resume_changes=optimizer"
                                               r".learning_rate"):
    lh.train(LinearTask, lower, tmp_path)
  assert not list(tmp_path.glob("config.*.json"))
  lower.resume_changes = "optimizer.learning_rate"
  final = lh.train(LinearTask, lower, tmp_path)
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
    lh.train(LinearTask, again, tmp_path)
  lh.train(LinearTask, _spike_config(0.05, num_train_steps=70, allow_schedule_change=True), tmp_path)
  assert [r["step"] for r in _rows(tmp_path)] == list(range(1, 71))


def test_resume_changes_are_only_for_fields_that_keep_the_shapes(tmp_path):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path)
  changed = _config(num_train_steps=5, global_batch_size=32,
                    resume_changes="global_batch_size")
  with pytest.raises(guards.ConfigError, match=r"config.resume_changes names "
                                               r"global_batch_size: only optimizer"):
    lh.train(LinearTask, changed, tmp_path)
  # The other fields changed with a resumable one: the hint says what may change.
  mixed = _config(num_train_steps=6, seed=3, allow_schedule_change=True)
  mixed.optimizer.learning_rate = 0.01
  with pytest.raises(guards.ConfigError, match=r"seed: 0 -> 3.*\(only optimizer.learning_"
                                               r"rate, .* may change, with --config."
                                               r"resume_changes\)"):
    lh.train(LinearTask, mixed, tmp_path)
  # Turning clipping on changes the optimizer state's layout: refused.
  clip = _config(num_train_steps=6, allow_schedule_change=True,
                 resume_changes="optimizer.grad_clip_norm")
  clip.optimizer.grad_clip_norm = 1.0
  with pytest.raises(guards.ConfigError, match=r"grad_clip_norm: 0.0 -> 1.0 turns clipping "
                                               r"on"):
    lh.train(LinearTask, clip, tmp_path)
  assert lh.checkpoint_steps(tmp_path) == [5] and not list(tmp_path.glob("config.*.json"))


# Item 2: the checkpoint carries the config that made it.
def test_a_missing_config_json_is_restored_from_the_checkpoint_and_checked(tmp_path):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path)
  original = json.loads((tmp_path / "config.json").read_text())
  saved = tmp_path / "checkpoints" / "5" / "config"
  assert saved.is_dir()
  (tmp_path / "config.json").unlink()
  other = _config(num_train_steps=5, seed=7)
  other.optimizer.learning_rate = 0.1
  with pytest.raises(guards.ConfigError, match=r"differs from the one that wrote the "
                                               r"checkpoint at step 5 .*learning_rate: "
                                               r"0.05 -> 0.1; seed: 0 -> 7"):
    lh.train(LinearTask, other, tmp_path)
  # config.json is back, from the checkpoint's copy; nothing else changed.
  assert json.loads((tmp_path / "config.json").read_text()) == original
  assert lh.checkpoint_steps(tmp_path) == [5] and [r["step"] for r in _rows(tmp_path)] == [
      1, 2, 3, 4, 5]
  # The same config resumes.
  (tmp_path / "config.json").unlink()
  lh.train(LinearTask, _config(num_train_steps=8, allow_schedule_change=True), tmp_path)
  assert lh.checkpoint_steps(tmp_path)[-1] == 8


def test_a_config_json_of_another_run_is_refused(tmp_path):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path / "a")
  lh.train(LinearTask, _config(num_train_steps=5, seed=3), tmp_path / "b")
  (tmp_path / "a" / "config.json").write_bytes((tmp_path / "b" / "config.json").read_bytes())
  with pytest.raises(guards.ConfigError, match=r"config.json does not match the config "
                                               r"saved with the checkpoint at step 5 "
                                               r"\(.*checkpoints/5/config\): seed: 3 -> 0"):
    lh.train(LinearTask, _config(num_train_steps=8, seed=3, allow_schedule_change=True), tmp_path / "a")
  assert lh.checkpoint_steps(tmp_path / "a") == [5]


def test_a_checkpoint_without_a_config_and_no_config_json_is_refused(tmp_path):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "5" / "config")  # As an older mmjax wrote it.
  (tmp_path / "config.json").unlink()
  with pytest.raises(guards.ConfigError, match=r"config.json is missing and the checkpoint "
                                               r"at step 5 carries no config"):
    lh.train(LinearTask, _config(num_train_steps=8, allow_schedule_change=True), tmp_path)
  assert not (tmp_path / "config.json").exists()


# Item 3: --eval_only is checked like a restart and replaces its rows.
def test_eval_only_refuses_another_experiment_and_replaces_its_rows(tmp_path):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path)
  other = _config(num_train_steps=5, seed=1)
  other.dataset.name = "fashion_mnist"
  with pytest.raises(guards.ConfigError, match=r"--eval_only: the config differs from the "
                                               r"one that wrote the checkpoint at step 5 .*"
                                               r"dataset.name: 'mnist' -> 'fashion_mnist'; "
                                               r"seed: 0 -> 1"):
    _eval_only(other, tmp_path)
  assert not (tmp_path / "eval_only").exists()
  # Evaluator fields, the schedule's length and the learning rate do not change what
  # is evaluated: allowed without an opt-in.
  same = _config(num_train_steps=50, eval_batch_size=8)
  same.optimizer.learning_rate = 0.01
  same.evals.more = dict(type="test_trainer:WError", scale=2.0)
  first = _eval_only(same, tmp_path)
  again = _eval_only(same, tmp_path)
  assert lh.strip_timing([first]) == lh.strip_timing([again])
  rows = _rows(tmp_path / "eval_only")
  assert [r["step"] for r in rows] == [5]
  events = list((tmp_path / "eval_only").glob("events.out.tfevents.*"))
  steps = [e.step for p in events for e in _events(p) if e.HasField("summary")]
  assert steps and set(steps) == {5} and len(steps) == len(first)  # One event per scalar.
  assert not (tmp_path / "config.5.json").exists()  # --eval_only records nothing.


def _events(path):
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  return [event_pb2.Event.FromString(r) for r in metrics_lib._records(str(path))]  # pylint: disable=protected-access


# Item 4: a damaged metrics.jsonl is repaired, the damage kept aside, said in one line.
@pytest.mark.parametrize("damage", [
    b"\xff\xfe\x00garbage\n",  # Not UTF-8.
    b'{"step": 4, "train/loss": 0.5\n',  # Torn, then a newline.
    b'[1, 2]\n{"no_step": 1}\n{"step": "4"}\n',  # JSON, but not rows.
    b'{"step": 5, "train/loss": 0.\xc3',  # Torn inside a UTF-8 character, at the end.
])
def test_a_damaged_metrics_jsonl_is_repaired_with_a_copy_kept(tmp_path, damage, caplog):
  lh.train(LinearTask, _config(num_train_steps=5), tmp_path)
  path = tmp_path / "metrics.jsonl"
  good = path.read_bytes()
  lines = good.splitlines(keepends=True)
  damaged = b"".join(lines[:2]) + damage + b"".join(lines[2:]) if damage.endswith(
      b"\n") else good + damage
  path.write_bytes(damaged)
  with caplog.at_level("WARNING"):
    lh.train(LinearTask, _config(num_train_steps=8, allow_schedule_change=True), tmp_path)
  assert [r["step"] for r in _rows(tmp_path)] == list(range(1, 9))
  assert path.read_bytes().startswith(good)  # The good rows, byte for byte.
  assert (tmp_path / "metrics.jsonl.damaged").read_bytes() == damaged
  said = [r.getMessage() for r in caplog.records if "damaged line" in r.getMessage()]
  assert len(said) == 1 and str(path) in said[0] and "metrics.jsonl.damaged" in said[0]


# Item 5: a batch that cannot fit in host memory is refused before it is read.
def test_an_absurd_batch_is_refused_before_any_batch_is_read(tmp_path, monkeypatch):
  with pytest.raises(guards.ConfigError, match=r"config.global_batch_size=1099511627776 "
                                               r"needs at least .* of host memory .* "
                                               r"available. Lower config.global_batch_size"):
    lh.train(LinearTask, _config(global_batch_size=2 ** 40), tmp_path / "a")
  assert not lh.checkpoint_steps(tmp_path / "a") and not (tmp_path / "a" / "metrics.jsonl").exists()
  # The estimate: LinearTask's preprocessed examples are x [4] and y, float32: 20 bytes.
  made = []
  monkeypatch.setattr(trainer, "create_train_state", lambda *a: made.append(a))
  monkeypatch.setattr(memory, "available_bytes", lambda: 2 * 20 * 1000)
  with pytest.raises(guards.ConfigError, match=r"global_batch_size=1008 needs at least 39.4 "
                                               r"KB .*20 B per preprocessed example.*has 39.1 "
                                               r"KB available.*below about 1000\)"):
    lh.train(LinearTask, _config(global_batch_size=1008), tmp_path / "b")
  assert not made  # Refused before the state or the data iterator was made.


@pytest.mark.slow  # A subprocess that imports JAX and sets up a run.
def test_an_absurd_batch_through_launch_is_one_line_at_once(tmp_path):
  proc = lh.run("experiments/mnist_lenet.py:smoke", tmp_path, "global_batch_size=67108864",
                check=False, timeout=120, env={"JAX_LOG_COMPILES": "1"})
  assert proc.returncode == 1
  assert "Compiling" not in proc.stderr
  last = proc.stderr.splitlines()[-1]
  assert re.fullmatch(r"error: config.global_batch_size=67108864 needs at least [\d.]+ GB of "
                      r"host memory .* Lower config.global_batch_size \(below about \d+\).",
                      last), last
  assert not lh.checkpoint_steps(tmp_path)


_SLOW_FIRST_BATCH = """
import sys, time
sys.path.insert(0, {tests!r})
from mmjax import parallel
from mmjax.train import trainer
from test_trainer import LinearTask, _config
class SlowBatches:  # The training loop waits 120 s for its first batch.
  def __iter__(self):
    return self
  def __next__(self):
    open({marker!r}, "w").close()
    time.sleep(120)
class SlowTask(LinearTask):
  def train_dataset(self, sharding):
    return SlowBatches()
mesh = parallel.make_mesh()
config = _config(num_train_steps=5)
trainer.train_and_evaluate(config, {workdir!r}, SlowTask(config, mesh), mesh)
"""


@pytest.mark.slow  # A subprocess that imports JAX and sets up a run.
def test_sigterm_while_the_first_batch_is_read_ends_the_run_at_once(tmp_path):
  marker, workdir = tmp_path / "reading", tmp_path / "w"
  script = _SLOW_FIRST_BATCH.format(tests=str(lh.REPO / "tests"), marker=str(marker),
                                    workdir=str(workdir))
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=lh.REPO,
                          env={**lh.env_with_devices(1), "PYTHONPATH": str(lh.REPO)},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not marker.exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=20)  # Not the 120 s the first batch would take.
  assert proc.returncode == -signal.SIGTERM
  assert not lh.checkpoint_steps(workdir)
