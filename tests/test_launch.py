"""launch.py end to end: smoke run, device counts, two processes, kill -9, SIGTERM, bad input.

Every run is a subprocess with its own number of fake CPU devices. The runs use
the MNIST experiment's smoke config, so they exercise the code a researcher runs.
"""
import signal
import subprocess
import time

import numpy as np
import pytest

import launch_helpers as lh

SMOKE = "experiments/mnist_lenet.py:smoke"

pytestmark = pytest.mark.slow  # Every test here runs on the prepared MNIST copy.
# A few more steps than the smoke run, with checkpoints every 10 steps.
LONGER = ("num_train_steps=300", "checkpoint_every_steps=10", "eval_every_steps=150",
          "log_every_steps=10")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """The smoke config on 1 and 4 devices in one process, and on 2 processes x 2 devices
  with the parameters split over each process's two devices (fsdp=2)."""
  root = tmp_path_factory.mktemp("smoke")
  port = lh.free_port()
  two_procs = [subprocess.Popen(
      lh.launch_cmd(SMOKE, root / "2x2", extra=[f"--coordinator_address=127.0.0.1:{port}",
                                                "--num_processes=2", f"--process_id={i}",
                                                "--config.mesh.fsdp=2",
                                                "--config.fsdp_min_size=64"]),
      cwd=lh.REPO, env=lh.env_with_devices(2), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  lh.run(SMOKE, root / "1", devices=1)
  lh.run(SMOKE, root / "4", devices=4)
  for p in two_procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-6000:]
  return root


def test_smoke_run_writes_metrics_checkpoints_and_summaries(smoke_runs):
  workdir = smoke_runs / "4"
  rows = lh.metrics(workdir)
  last = rows[-1]
  assert last["step"] == 20
  for key in ("train/loss", "train/learning_rate", "train/accuracy", "eval/loss", "eval/accuracy"):
    assert key in last
  assert rows[0]["train/loss"] > last["train/loss"]
  assert last["eval/accuracy"] > 0.3  # Chance is 0.1.
  assert lh.checkpoint_steps(workdir) == [10, 20]
  assert list(workdir.glob("events.out.tfevents.*"))
  assert (workdir / "config.json").exists()


def test_losses_do_not_depend_on_the_device_count(smoke_runs):
  one = lh.strip_timing(lh.metrics(smoke_runs / "1"))
  four = lh.strip_timing(lh.metrics(smoke_runs / "4"))
  assert [r["step"] for r in one] == [r["step"] for r in four]
  for a, b in zip(one, four):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=f"{k} at {a['step']}")


def test_two_processes_match_one_process(smoke_runs):
  """2 processes x 2 devices (gloo collectives on 127.0.0.1), FSDP over each process's
  pair, == 1 process x 4 devices, data parallel."""
  two = lh.strip_timing(lh.metrics(smoke_runs / "2x2"))
  four = lh.strip_timing(lh.metrics(smoke_runs / "4"))
  assert len(two) == len(four)
  for a, b in zip(two, four):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=f"{k} at {a['step']}")
  assert lh.checkpoint_steps(smoke_runs / "2x2") == [10, 20]


def test_eval_only_reproduces_the_smoke_runs_last_evaluation(smoke_runs):
  workdir = smoke_runs / "4"
  lh.run(SMOKE, workdir, devices=4, extra=["--eval_only"])
  last = lh.metrics(workdir)[-1]
  again = lh.metrics(workdir / "eval_only")[-1]
  assert again["step"] == last["step"] == 20
  evals = {k for k in last if k.startswith("eval/") and k != "eval/seconds"}
  assert evals == {"eval/loss", "eval/accuracy"}
  for k in evals:
    assert again[k] == last[k], k
  assert lh.metrics(workdir)[-1] == last  # Nothing trained, nothing appended.


def _wait_for_checkpoint(proc, workdir, timeout=240):
  t = time.time()
  while not lh.checkpoint_steps(workdir):
    assert proc.poll() is None, proc.stderr.read()[-6000:]
    assert time.time() - t < timeout, "no checkpoint appeared"
    time.sleep(0.02)


def test_resume_after_kill_9_is_exact(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  proc = subprocess.Popen(lh.launch_cmd(SMOKE, killed, *LONGER), cwd=lh.REPO,
                          env=lh.env_with_devices(2), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, killed)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(lh.checkpoint_steps(killed)) < 300, "the run ended before it was killed"
  resumed = lh.run(SMOKE, killed, *LONGER, devices=2)
  assert "Resumed from step" in resumed.stderr
  lh.run(SMOKE, straight, *LONGER, devices=2)
  # Every logged step, train and eval, as if the run had never been interrupted.
  assert lh.strip_timing(lh.metrics(killed)) == lh.strip_timing(lh.metrics(straight))


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  proc = subprocess.Popen(lh.launch_cmd(SMOKE, tmp_path, *LONGER, "checkpoint_every_steps=100"),
                          cwd=lh.REPO, env=lh.env_with_devices(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, tmp_path)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-6000:]
  steps = lh.checkpoint_steps(tmp_path)
  assert steps[0] == 100 and steps[-1] > 100 and steps[-1] < 300, steps
  assert "Pre-empted" in err


@pytest.mark.parametrize("override, message", [
    ("global_batch_size=36", "multiple of 8"),
    ("num_train_step=5", "num_train_step"),
    ("dataset.download=False --config.dataset.data_dir=/nonexistent", "/nonexistent"),
])
def test_bad_config_fails_fast_with_a_clear_message(tmp_path, override, message):
  extra = override.split(" ")
  proc = lh.run(SMOKE, tmp_path, extra[0], devices=8, check=False, extra=extra[1:],
                timeout=120, env={"JAX_LOG_COMPILES": "1"})  # Logs "Compiling <name>".
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Compiling" not in proc.stderr
  assert not lh.checkpoint_steps(tmp_path)
