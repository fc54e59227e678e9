"""Runs the trainer: launch.py in subprocesses with a chosen number of fake CPU devices
(`run`), or in this process (`train`); reads what a run wrote."""
import os
import pathlib
import socket
import subprocess
import sys

import jax

from mmjax import tasks
from mmjax.train import metrics as metrics_lib
from mmjax import parallel
from mmjax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def env_with_devices(n: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
  env["PYTHONUNBUFFERED"] = "1"
  return env


def launch_cmd(config: str, workdir, *overrides: str, extra=()) -> list[str]:
  return [sys.executable, str(REPO / "launch.py"), f"--config={config}",
          f"--workdir={workdir}", *[f"--config.{o}" for o in overrides], *extra]


def run(config: str, workdir, *overrides: str, devices: int = 1, extra=(), check=True,
        timeout=300, env=None) -> subprocess.CompletedProcess:
  proc = subprocess.run(launch_cmd(config, workdir, *overrides, extra=extra), cwd=REPO,
                        env={**env_with_devices(devices), **(env or {})},
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"launch.py failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  return proc


def train(task_cls, config, workdir, devices=None, mesh_shape=None) -> dict:
  """Trains and evaluates in this process, as launch.py does after its checks.

  `task_cls(config, mesh)` is the task (None: the config's registered one), on a mesh of
  `devices` (n: the first n; a list; None: all) shaped `mesh_shape` (None: all along
  data). Returns the final metrics."""
  if isinstance(devices, int):
    devices = jax.devices()[:devices]
  mesh = parallel.make_mesh(devices, mesh_shape)
  task = (task_cls or tasks.get_task)(config, mesh)
  return trainer.train_and_evaluate(config, str(workdir), task, mesh)


def metrics(workdir) -> list[dict]:
  """The rows of a run's metrics.jsonl, in order."""
  return metrics_lib.read_jsonl(str(pathlib.Path(workdir) / "metrics.jsonl"))


def checkpoint_steps(workdir) -> list[int]:
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Keys whose values depend on wall-clock time, not on the computation.
TIMING_KEYS = ("train/steps_per_sec", "train/examples_per_sec", "train/tflops_per_device",
               "train/mfu", "eval/seconds")


def strip_timing(rows: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
