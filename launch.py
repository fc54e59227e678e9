r"""Runs one experiment: python launch.py --config=experiments/X.py[:arg] --workdir=DIR.

Override any config field on the command line, e.g. `--config.seed=3` or
`--config.optimizer.learning_rate=1e-3`. Restarting the same command with the same
--workdir resumes from the last checkpoint. With `--eval_only` the config's evaluators
run on the workdir's latest checkpoint, without training (results in <workdir>/eval_only).

Several hosts: run the same command on every host. On TPU pods and under SLURM add
`--distributed` (JAX finds its peers); elsewhere give `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` on each.

Expected failures (a bad flag or field, a missing config file or dataset, a full disk,
a workdir in use, a corrupt checkpoint, NaN) end with one line on stderr, last and
alone, and exit status 1 (2 for flags); `--verbose_errors` or MMJAX_TRACEBACK=1 shows
the traceback instead.
"""
import errno
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_EVAL_ONLY = flags.DEFINE_bool(
    "eval_only", False, "Run the config's evaluators on the workdir's latest checkpoint "
    "and stop; metrics and images go to <workdir>/eval_only.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection "
    "(TPU pods, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Split this host's CPU into N devices for data parallelism (one "
    "per core on a CPU-only machine; XLA's --xla_force_host_platform_device_count). "
    "Accelerators are unaffected.")
_VERBOSE_ERRORS = flags.DEFINE_bool(
    "verbose_errors", False, "Show the full traceback of expected errors (as does "
    "MMJAX_TRACEBACK=1).")
flags.mark_flags_as_required(["config", "workdir"])


def _verbose() -> bool:
  return os.environ.get("MMJAX_TRACEBACK", "") not in ("", "0") or (
      "--verbose_errors" in sys.argv)


def _fail(e: BaseException, code: int = 1):
  """Prints `error: <message>` (one line) to stderr and exits at once.

  os._exit: no interpreter teardown, whose errors (background checkpoint threads on
  a full disk) would bury the message.
  """
  message = " ".join(str(e).split()) or type(e).__name__
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  os._exit(code)


def _parse_flags(argv):
  """absl's flag parsing, with a one-line error for a bad flag, field or config file."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # Read lazily, errors and all: make it fail here if it must.
    return argv
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, IOError, ...
    if _verbose():
      raise
    if isinstance(e, OSError):  # "Failed loading config file config_config ... [Errno 2] ..."
      message = f"--config: {str(e.__cause__ or e).strip().splitlines()[-1].strip()}"
    elif isinstance(e, flags.Error):
      message = f"{e} (see --helpfull)"
    else:  # Unknown config field: AttributeError("'field'\nDid you mean ...").
      text = str(e).strip("'").replace("\\'", "'").replace("\\n", " ")
      message = f"--config: unknown field {' '.join(text.split())}"
    _fail(message, 2)


def _is_expected(e: BaseException) -> bool:
  from mmjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  return isinstance(e, (ValueError, FloatingPointError, FileNotFoundError,
                        checkpoints.WorkdirLocked, checkpoints.CorruptCheckpointError,
                        app.UsageError)) or (
      isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES))


def main(argv):
  try:
    _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    if _verbose() or not _is_expected(e):
      raise
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      e = f"No space left to write in {_WORKDIR.value} ({e}). Free some, then rerun."
    _fail(e)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from mmjax.train import host
  if _CONFIG.value.get("reuse_host_memory", True):
    host.reuse_freed_memory()  # Before JAX starts its threads; see mmjax/train/host.py.
  if _CPU_DEVICES.value is not None:
    host.split_cpu(_CPU_DEVICES.value)
  import jax  # Imported after flag parsing, so --help and flag errors are instant.

  if _COORDINATOR.value is not None:
    # CPU collectives across processes (harmless where an accelerator does them).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()

  from mmjax import parallel
  from mmjax import tasks
  from mmjax.train import trainer

  config = _CONFIG.value
  logging.info("Process %d of %d; %d local of %d devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices())
  mesh = parallel.make_mesh(shape=config.get("mesh"))
  task = tasks.get_task(config, mesh)  # Cheap: checks the model's fields, reads no data.
  # The trainer checks the batch size and the config, and takes the workdir's lock,
  # before it logs the config, reads any data or compiles anything.
  if _EVAL_ONLY.value:
    final = trainer.evaluate_only(config, _WORKDIR.value, task, mesh)
  else:
    final = trainer.train_and_evaluate(config, _WORKDIR.value, task, mesh)
  logging.info("Final metrics: %s", final)


if __name__ == "__main__":
  py_logging.getLogger("absl").setLevel(py_logging.INFO)
  app.run(main, flags_parser=_parse_flags)
