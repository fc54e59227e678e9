"""The command line (mmjax/launch.py): --help, --print_config, configs by module name, the
one-line errors (each refused before training, leaving no workdir behind), the console.

The error tests stop before JAX is imported or before any data is read, so they are fast;
the console's line count needs a whole (smoke) run and is slow.
"""
import errno
import os
import subprocess
import sys

import pytest

import launch_helpers as lh
from mmjax import launch

SMOKE = "experiments/mnist_lenet.py:smoke"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _launch(*args, env=None, timeout=180, module=True) -> subprocess.CompletedProcess:
  entry = ["-m", "mmjax.launch"] if module else [str(lh.REPO / "launch.py")]
  return subprocess.run([sys.executable, *entry, *args], cwd=lh.REPO,
                        env={**lh.env_with_devices(1), **(env or {})}, capture_output=True,
                        text=True, timeout=timeout)


def _one_line_error(proc, code=None) -> str:
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0 and (code is None or proc.returncode == code), proc.stderr
  assert 1 <= len(lines) <= 2 and lines[-1].startswith("error: "), proc.stderr
  return lines[-1]


def test_help_exits_0():
  proc = _launch("--help", module=False)
  assert proc.returncode == 0, proc.stderr
  assert "--print_config" in proc.stdout and "--verbose" in proc.stdout


def test_print_config_prints_every_field_and_exits_0(tmp_path):
  proc = _launch("--config=mnist_lenet:smoke", "--config.seed=7", "--print_config")
  assert proc.returncode == 0, proc.stderr
  for line in ("seed: 7", "num_train_steps: 20", "  learning_rate: 0.003", "keep_checkpoints: 3",
               "  data_dir: null", "model: lenet5"):
    assert line in proc.stdout.splitlines(), proc.stdout
  assert not proc.stderr.strip()


@pytest.mark.parametrize("value", ["mnist_lenet", "mmjax.experiments.mnist_lenet",
                                   "mnist_lenet.py", "experiments/mnist_lenet.py"])
def test_a_config_by_module_name_or_path(value):
  assert launch.resolve_config(f"{value}:smoke").endswith("experiments/mnist_lenet.py:smoke")


def test_an_unknown_config_lists_the_experiments(tmp_path):
  line = _one_line_error(_launch("--config=mnist_lenat", f"--workdir={tmp_path / 'w'}"), 2)
  assert "no config file or module 'mnist_lenat'" in line and "mnist_lenet" in line
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("field, suggestion", [
    ("lerning_rate", "did you mean optimizer.learning_rate?"),
    ("num_train_step", "did you mean num_train_steps?"),
    ("optimizer.lerning_rate", "did you mean optimizer.learning_rate?"),
])
def test_a_misspelled_field_gets_a_did_you_mean(tmp_path, field, suggestion):
  line = _one_line_error(_launch(f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}",
                                 f"--config.{field}=1"), 2)
  assert line == f"error: --config.{field}: unknown field; {suggestion}"
  assert not (tmp_path / "w").exists()


def test_a_bad_config_argument_lists_the_known_ones(tmp_path):
  line = _one_line_error(_launch("--config=mnist_lenet.py:smoek",
                                 f"--workdir={tmp_path / 'w'}"), 2)
  assert line == ("error: --config: Unknown config argument 'smoek' in 'smoek'; known: "
                  "['dataset', 'model', 'smoke'].")
  assert not (tmp_path / "w").exists()


def _unwritable(tmp_path) -> str:
  """An existing folder this process cannot write in (root writes anywhere but /sys)."""
  if os.geteuid() == 0:
    return "/sys/kernel"
  folder = tmp_path / "ro"
  folder.mkdir()
  folder.chmod(0o555)
  return str(folder)


@pytest.mark.parametrize("kind", ["file", "under_a_file", "proc", "unwritable"])
def test_an_unusable_workdir_is_one_line_before_jax(tmp_path, kind):
  (tmp_path / "f").write_text("x")
  workdir, expected = {
      "file": (tmp_path / "f", "is a file, not a folder"),
      "under_a_file": (tmp_path / "f" / "w", f"cannot be created: {tmp_path / 'f'} is a file"),
      "proc": ("/proc/mmjax-x", "cannot be created (/proc does not allow new folders)"),
      "unwritable": (_unwritable(tmp_path), "is not writable (permission denied)"),
  }[kind]
  before = sorted(os.listdir(tmp_path))
  proc = _launch(f"--config={SMOKE}", f"--workdir={workdir}", timeout=60)
  line = _one_line_error(proc, 1)
  assert line.startswith(f"error: --workdir {workdir} ") and expected in line, line
  assert sorted(os.listdir(tmp_path)) == before
  assert (tmp_path / "f").read_text() == "x"


def test_a_workdir_error_imports_no_jax():
  proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmjax.launch",
                         f"--config={SMOKE}", "--workdir=/proc/mmjax-x"], cwd=lh.REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith("error: --workdir")
  imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  assert "ml_collections" in imported  # The parse of -X importtime works.
  assert not imported & {"jax", "orbax", "tensorflow", "mmjax.train.trainer"}, imported


def test_the_workdir_check_comes_before_jax(tmp_path):
  code = ("import sys\nfrom mmjax import launch\n"
          f"try:\n  launch.prepare_workdir({str(tmp_path / 'f' / 'w')!r})\n"
          "except ValueError as e:\n  print('refused', 'jax' in sys.modules)\n")
  (tmp_path / "f").write_text("x")
  proc = subprocess.run([sys.executable, "-c", code], cwd=lh.REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.stdout.strip() == "refused False", proc.stderr


def test_a_read_only_file_system_is_named_and_nothing_is_left(tmp_path, monkeypatch):
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(launch.tempfile, "mkstemp", read_only)
  with pytest.raises(ValueError) as e:
    launch.prepare_workdir(str(tmp_path / "a" / "b"))
  assert str(e.value) == (f"--workdir {tmp_path / 'a' / 'b'} cannot be created (it is on a "
                          f"read-only file system); give a folder you can write to.")
  assert not (tmp_path / "a").exists()


def test_the_offline_dataset_error_is_short_and_leaves_no_workdir(tmp_path):
  """No prepared copy, its download host unreachable (a proxy on a closed port)."""
  env = {name: "http://127.0.0.1:9" for name in PROXY_VARS}
  env.update(NO_PROXY="", no_proxy="")
  args = (f"--config={SMOKE}", f"--workdir={tmp_path / 'w' / 'run'}",
          f"--config.dataset.data_dir={tmp_path / 'tfds'}")
  line = _one_line_error(_launch(*args, env=env))
  assert "Dataset 'mnist' is not prepared in" in line and "no answer from its download host" in line
  assert "Error" not in line and "HTTP" not in line, line
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_the_offline_dataset_error_with_verbose_keeps_the_librarys_text(tmp_path):
  env = {name: "http://127.0.0.1:9" for name in PROXY_VARS}
  env.update(NO_PROXY="", no_proxy="")
  proc = _launch(f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}", "--verbose",
                 f"--config.dataset.data_dir={tmp_path / 'tfds'}", env=env)
  assert proc.returncode == 1
  assert "Error" in proc.stderr.splitlines()[-1]  # requests' exception, in full.
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_smoke_run_prints_few_readable_lines_and_a_summary(tmp_path):
  workdir = tmp_path / "w"
  proc = _launch("--config=mnist_lenet:smoke", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) <= 40, proc.stderr
  assert all(len(line) <= 160 for line in lines), proc.stderr
  assert not any(word in proc.stderr for word in ("orbax", "CheckpointManager",
                                                  "Unable to initialize backend", "I1", "Traceback"))
  steps = [line for line in lines if line.startswith("step ")]
  assert steps[0].startswith("step 5/20  loss ") and " img/s  ETA " in steps[0], steps
  assert steps[-1].startswith("step 20/20  loss "), steps
  assert any(line.startswith("eval 20  accuracy ") for line in lines)
  assert lines[-3:] == [f"  metrics      {workdir}/metrics.jsonl",
                        f"  tensorboard  tensorboard --logdir {workdir}",
                        f"  checkpoints  {workdir}/checkpoints"]
  assert lh.checkpoint_steps(workdir) == [10, 20]
  # --verbose: every library's INFO logs again.
  again = _launch("--config=mnist_lenet:smoke", f"--workdir={tmp_path / 'v'}", "--verbose")
  assert again.returncode == 0 and "Config:" in again.stderr
  assert len(again.stderr.splitlines()) > 60


def test_step_lines_and_seconds_granular_eta():
  from mmjax.train import console
  assert [console.format_duration(s) for s in (0, 45, 151, 3725)] == ["0s", "45s", "2m31s",
                                                                       "1h02m05s"]
  scalars = {"train/loss": 0.07211, "train/accuracy": 0.979, "train/examples_per_sec": 1210.4,
             "train/steps_per_sec": 25.0, "train/grad_norm": 1.0}
  assert console.step_line(938, 4690, scalars) == (
      "step 938/4690  loss 0.07211  acc 0.979  1,210 img/s  ETA 2m30s")
  assert console.eval_line(938, {"eval/accuracy": 0.9912, "eval/loss": 0.0301,
                                 "eval/seconds": 3.0}) == "eval 938  accuracy 0.9912  loss 0.0301"


def test_a_progress_bar_on_a_terminal_only(monkeypatch):
  import io
  import logging
  from mmjax.train import console

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  monkeypatch.setenv("COLUMNS", "100")
  for stream, expect_bar in ((Terminal(), True), (io.StringIO(), False)):
    monkeypatch.setattr(sys, "stderr", stream)
    logger = logging.getLogger("mmjax.console")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    console.configure()
    c = console.Console(10, 0)
    for step in range(1, 11):
      c.advance(step)
    c.write_scalars(10, {"train/loss": 1.0})
    c.close()
    assert "step 10/10  loss 1\n" in stream.getvalue()
    assert ("10/10 [" in stream.getvalue()) == expect_bar, stream.getvalue()
