r"""Runs one experiment: python -m mmjax.launch --config=CONFIG[:arg] --workdir=DIR.

CONFIG is a config file (`experiments/mnist_lenet.py`) or a module name
(`mmjax.experiments.mnist_lenet`, or just `mnist_lenet`); `mmjax-launch` and the
checkout's `python launch.py` are the same command. Override any config field on the
command line, e.g. `--config.seed=3` or `--config.optimizer.learning_rate=1e-3`;
`--print_config` prints the resolved config and exits. Restarting the same command with
the same --workdir resumes from the last checkpoint. With `--eval_only` the config's
evaluators run on the workdir's latest checkpoint, without training (results in
<workdir>/eval_only).

The console shows one line per logged step, a progress bar on a terminal and a summary
at the end; libraries log warnings only. `--verbose` (or absl's `-v`) brings back every
log, the config and the full text of errors.

Several hosts: run the same command on every host. On TPU pods and under SLURM add
`--distributed` (JAX finds its peers); elsewhere give `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` on each.

Expected failures (a bad flag or field, a missing config file or dataset, an unusable
workdir, a full disk, a workdir in use, a corrupt checkpoint, NaN) end with one line on
stderr, last and alone, and exit status 1 (2 for flags); a run refused before it
trained leaves no workdir it created behind. `--verbose_errors` or MMJAX_TRACEBACK=1
shows the traceback instead.
"""
import difflib
import errno
import importlib.util
import logging as py_logging
import os
import pathlib
import re
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a file (experiments/mnist_lenet.py) or a module "
    "(mmjax.experiments.mnist_lenet, mnist_lenet), with an optional :argument.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_EVAL_ONLY = flags.DEFINE_bool(
    "eval_only", False, "Run the config's evaluators on the workdir's latest checkpoint "
    "and stop; metrics and images go to <workdir>/eval_only.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (every field, defaults included) "
    "and exit.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show every library's INFO logs, the config and the full text of "
    "errors (as absl's -v does).")
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
flags.mark_flag_as_required("config")

_EXPERIMENTS_PACKAGE = "mmjax.experiments"


def _traceback() -> bool:
  return os.environ.get("MMJAX_TRACEBACK", "") not in ("", "0") or (
      "--verbose_errors" in sys.argv)


def _verbose() -> bool:
  """--verbose, or absl's -v / --verbosity given on the command line."""
  if "--verbose" in sys.argv:
    return True
  try:
    return _VERBOSE.value or flags.FLAGS["verbosity"].present > 0
  except flags.UnparsedFlagAccessError:
    return False


def _fail(e: BaseException | str, code: int = 1):
  """Prints `error: <message>` (one line) to stderr and exits at once.

  os._exit: no interpreter teardown, whose errors (background checkpoint threads on
  a full disk) would bury the message.
  """
  message = " ".join(str(e).split()) or type(e).__name__
  _cleanup_workdir()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  os._exit(code)


# --- Configs by file or by module name.

def _experiments_dir() -> pathlib.Path | None:
  """The folder of the packaged experiments: `mmjax.experiments` when installed, else
  the checkout's `experiments/` beside the `mmjax` package."""
  try:
    spec = importlib.util.find_spec(_EXPERIMENTS_PACKAGE)
  except ImportError:
    spec = None
  if spec is not None and spec.submodule_search_locations:
    return pathlib.Path(list(spec.submodule_search_locations)[0])
  checkout = pathlib.Path(__file__).resolve().parents[1] / "experiments"
  return checkout if checkout.is_dir() else None


def resolve_config(value: str) -> str:
  """`--config`'s value with a module name (`mnist_lenet`, `mmjax.experiments.mnist_lenet`,
  `package.module`) replaced by its file; a path is returned unchanged."""
  name, colon, arg = value.partition(":")
  folder = _experiments_dir()
  if os.path.exists(name) or os.sep in name or not name:
    return value
  if name.endswith(".py"):  # `mnist_lenet.py`: a file of the experiments' folder.
    if folder is not None and (folder / name).is_file():
      return f"{folder / name}{colon}{arg}"
    return value
  short = name.removeprefix(_EXPERIMENTS_PACKAGE + ".")
  if "." not in short and folder is not None and (folder / f"{short}.py").is_file():
    return f"{folder / short}.py{colon}{arg}"
  try:
    spec = importlib.util.find_spec(name) if "." in name else None
  except ImportError:
    spec = None
  if spec is not None and spec.origin and spec.origin.endswith(".py"):
    return f"{spec.origin}{colon}{arg}"
  known = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")) if folder else []
  raise ValueError(f"--config: no config file or module {name!r}; the experiments: "
                   f"{', '.join(known) or 'none found'}.")


def _rewrite_config_flag(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


# --- Flag parsing with one-line errors.

def _config_fields(config) -> list[str]:
  """Every field of a config, as dotted paths."""
  out = []
  for key, value in config.items():
    out.append(key)
    if hasattr(value, "items") and not isinstance(value, dict):
      out += [f"{key}.{sub}" for sub in _config_fields(value)]
  return out


def _load_config(argv: list[str]):
  """The config of `--config` before the overrides; an empty dict if it cannot be made."""
  value = next((a[len("--config="):] for a in argv if a.startswith("--config=")), "")
  path, _, arg = value.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_mmjax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return {}


def _unknown_field_message(e: Exception, argv: list[str]) -> str:
  """'--config.lerning_rate: no such field; did you mean optimizer.learning_rate?'"""
  fields = _config_fields(_load_config(argv))
  given = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
  unknown = [g for g in given if g not in fields]
  match = re.search(r"[\w.]+", str(e))
  bad = unknown[0] if unknown else (match.group(0) if match else "?")
  leaves = {f.rsplit(".", 1)[-1]: f for f in fields}
  close = difflib.get_close_matches(bad, fields, n=3, cutoff=0.8)
  close += [leaves[n] for n in difflib.get_close_matches(bad.rsplit(".", 1)[-1], list(leaves),
                                                          n=3, cutoff=0.75)]
  close = list(dict.fromkeys(close))[:3]
  hint = f"; did you mean {' or '.join(close)}?" if close else " (--print_config lists them)."
  return f"--config.{bad}: unknown field{hint}"


def _value_error(e: BaseException) -> ValueError | None:
  while e is not None:
    if isinstance(e, ValueError):
      return e
    e = e.__cause__ or e.__context__
  return None


def _parse_flags(argv):
  """absl's flag parsing, with a one-line error for a bad flag, field or config file."""
  if any(a in ("--help", "-h", "--helpshort", "-?") for a in argv[1:]):
    print(f"{__doc__.strip()}\n\nFlags:\n{flags.FLAGS.module_help(__name__)}\n\n"
          f"--config.<field>=<value> overrides a field (--print_config lists them); "
          f"--helpfull lists absl's flags too.")
    sys.exit(0)
  try:
    argv = _rewrite_config_flag(argv)
    argv = flags.FLAGS(argv)
    _CONFIG.value.to_dict()  # Read lazily, errors and all: make it fail here if it must.
    return argv
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, IOError, ...
    if _traceback():
      raise
    cause = e.__cause__ or e
    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    if "Error whilst parsing config file" in str(e) and ": " in last:
      _fail(f"--config: {last.split(': ', 1)[1]}", 2)  # get_config raised, e.g. `:smoek`.
    value_error = _value_error(e)
    if isinstance(e, ValueError) and str(e).startswith("--config:"):
      message = str(e)  # A config that is no file or module.
    elif value_error is not None and not isinstance(e, (flags.Error, AttributeError)):
      message = f"--config: {value_error}"  # The config's argument (`:smoek`).
    elif isinstance(cause, OSError):  # "Failed loading config file ... [Errno 2] ..."
      message = f"--config: {str(cause).strip().splitlines()[-1].strip()}"
    elif isinstance(e, flags.Error):
      if value_error is not None:  # A config argument refused while the flag is parsed.
        message = f"--config: {value_error}"
      else:
        message = f"{e} (see --helpfull)"
    else:  # Unknown config field: AttributeError("'field'\nDid you mean ...").
      message = _unknown_field_message(e, argv)
    _fail(message, 2)


# --- The workdir: checked before JAX is imported, removed if this run made it for nothing.

_created: list[str] = []  # The folders this run created for its workdir, outermost first.


def prepare_workdir(workdir: str) -> list[str]:
  """Creates `workdir` (and missing parents) and checks that files can be written in it.

  Returns the folders created, outermost first. Raises ValueError with a one-line
  message when it is a file, lies under a file, cannot be created or is not writable.
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--workdir {workdir} is a file, not a folder; give a folder's path.")
  missing, parent = [], path
  while not os.path.exists(parent):
    missing.append(parent)
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"--workdir {workdir} cannot be created: {parent} is a file, not a "
                     f"folder; give another path.")
  created = []
  try:
    for folder in reversed(missing):
      try:
        os.mkdir(folder)
        created.append(folder)
      except FileExistsError:  # Another process of the run made it.
        if not os.path.isdir(folder):
          raise
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    for folder in reversed(created):
      os.rmdir(folder)
    why = {errno.EROFS: "it is on a read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.ENOENT: f"{parent} does not allow new folders",
           errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}.get(
               e.errno, e.strerror or type(e).__name__)
    verb = "cannot be created" if missing else "is not writable"
    raise ValueError(f"--workdir {workdir} {verb} ({why}); give a folder you can "
                     f"write to.") from None
  return created


def _cleanup_workdir():
  """Removes the workdir (and parents) this run created if the run stopped before it
  logged a step or saved a checkpoint (it was refused)."""
  if not _created:
    return
  workdir = _created[-1]
  ckpt = os.path.join(workdir, "checkpoints")
  jsonl = os.path.join(workdir, "metrics.jsonl")
  if (os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))) or (
      os.path.exists(jsonl) and os.path.getsize(jsonl)):
    return
  shutil.rmtree(workdir, ignore_errors=True)
  for folder in reversed(_created[:-1]):
    try:
      os.rmdir(folder)
    except OSError:
      break


# --- Logging and the console.

class _QuietLibraries(py_logging.Filter):
  """At the default verbosity: TFDS's warnings about folders mmjax checks itself."""

  def filter(self, record):
    return not ("tensorflow_datasets" in record.pathname and
                record.levelno < py_logging.ERROR)


def _configure_logging(verbose: bool):
  """Default: WARNING for every library (absl, Orbax, TFDS, JAX, Grain); the console's
  lines plain on stderr. Verbose: INFO everywhere, as absl logs it."""
  from mmjax.train import console  # pylint: disable=g-import-not-at-top
  level = py_logging.INFO if verbose else py_logging.WARNING
  if not (verbose and flags.FLAGS["verbosity"].present):
    logging.set_verbosity(level)
  py_logging.getLogger().setLevel(level)
  py_logging.getLogger("absl").setLevel(level)
  if not verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.get_absl_handler().addFilter(_QuietLibraries())
  console.configure(verbose=verbose)


def _is_expected(e: BaseException) -> bool:
  if isinstance(e, (ValueError, FloatingPointError, FileNotFoundError, app.UsageError)) or (
      isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES,
                                             errno.EROFS)):
    return True
  checkpoints = sys.modules.get("mmjax.train.checkpoints")  # Not imported: not its errors.
  return checkpoints is not None and isinstance(
      e, (checkpoints.WorkdirLocked, checkpoints.CorruptCheckpointError))


def _short_dataset_error(e: BaseException) -> str:
  """The offline dataset error without the network library's text (kept by --verbose)."""
  return re.sub(r"(no answer from its download host|downloading it failed) \(.*?\)\. (Set )",
                r"\1 (--verbose shows why). \2", str(e), flags=re.S)


def main(argv):
  try:
    _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    if _traceback() or not _is_expected(e):
      _cleanup_workdir()
      raise
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      e = f"No space left to write in {_WORKDIR.value} ({e}). Free some, then rerun."
    elif type(e).__name__ == "DatasetNotFoundError" and not _verbose():
      e = _short_dataset_error(e)
    _fail(e)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    print(config)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where checkpoints and metrics go).")
  if not _EVAL_ONLY.value:
    _created[:] = prepare_workdir(_WORKDIR.value)
  elif not os.path.isdir(_WORKDIR.value):
    raise FileNotFoundError(f"--eval_only: {_WORKDIR.value} is not a workdir; train first "
                            f"(the same command without --eval_only).")
  _configure_logging(_verbose())
  from mmjax.train import host  # pylint: disable=g-import-not-at-top
  if config.get("reuse_host_memory", True):
    host.reuse_freed_memory()  # Before JAX starts its threads; see mmjax/train/host.py.
  if _CPU_DEVICES.value is not None:
    host.split_cpu(_CPU_DEVICES.value)
  import jax  # pylint: disable=g-import-not-at-top  # After the checks: they are instant.

  if _COORDINATOR.value is not None:
    # CPU collectives across processes (harmless where an accelerator does them).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()

  from mmjax import parallel  # pylint: disable=g-import-not-at-top
  from mmjax import tasks  # pylint: disable=g-import-not-at-top
  from mmjax.train import console  # pylint: disable=g-import-not-at-top
  from mmjax.train import trainer  # pylint: disable=g-import-not-at-top

  py_logging.info("Process %d of %d; %d local of %d devices: %s", jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count(),
                  jax.devices())
  mesh = parallel.make_mesh(shape=config.get("mesh"))
  task = tasks.get_task(config, mesh)  # Cheap: checks the model's fields, reads no data.
  # The trainer checks the batch size and the config, and takes the workdir's lock,
  # before it logs the config, reads any data or compiles anything.
  if _EVAL_ONLY.value:
    final = trainer.evaluate_only(config, _WORKDIR.value, task, mesh)
    out_dir = os.path.join(_WORKDIR.value, "eval_only")
  else:
    final = trainer.train_and_evaluate(config, _WORKDIR.value, task, mesh)
    out_dir = _WORKDIR.value
  py_logging.info("Final metrics: %s", final)
  if jax.process_index() == 0:
    console.summary(final, out_dir, _WORKDIR.value)


def run():
  """The command's entry point (`python -m mmjax.launch`, `mmjax-launch`, `launch.py`)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
