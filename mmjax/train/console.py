"""What a training run shows on the console: a line per logged step, a bar, a summary.

`Console` is a metric writer: at each logging step it prints
`step 938/4690  loss 0.0721  acc 0.979  1,210 img/s  ETA 2m31s` (the ETA from the steps
per second since the last line), and the evaluators' results as
`eval 938  accuracy 0.9912  loss 0.0301`. On a terminal a tqdm progress bar runs below
the lines. The lines go to the `mmjax.console` logger: `configure()` (called by the
launcher) prints them plain on stderr; a program of one's own sees them as INFO records.
"""
import logging
import os
import sys
import time
from typing import Any, Mapping

from mmjax.train import metrics as metrics_lib

_log = logging.getLogger("mmjax.console")


class _PlainHandler(logging.Handler):
  """The message alone, written above a running progress bar (tqdm.write)."""

  def emit(self, record):
    try:
      import tqdm  # pylint: disable=g-import-not-at-top
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def configure(verbose: bool = False):
  """Console lines plain on stderr (INFO), apart from the root logger's handlers."""
  del verbose  # The lines are shown at every verbosity.
  _log.handlers[:] = [_PlainHandler()]
  _log.setLevel(logging.INFO)
  _log.propagate = False


def info(message: str, *args):
  _log.info(message, *args)


def format_duration(seconds: float) -> str:
  """45 -> '45s', 151 -> '2m31s', 3725 -> '1h02m05s'."""
  seconds = max(0, int(round(seconds)))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  return f"{m}m{s:02d}s" if m else f"{s}s"


def _number(value: float) -> str:
  return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


# Short names for the train metrics the step line shows, in this order.
_TRAIN = (("train/loss", "loss"), ("train/accuracy", "acc"),
          ("train/contrastive_accuracy", "acc"))


def step_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
  """`step 938/4690  loss 0.0721  acc 0.979  1,210 img/s  ETA 2m31s`."""
  parts = [f"step {step}/{total}"]
  shown = set()
  for key, name in _TRAIN:
    if key in scalars and name not in shown:
      parts.append(f"{name} {_number(scalars[key])}")
      shown.add(name)
  if "train/examples_per_sec" in scalars:
    parts.append(f"{scalars['train/examples_per_sec']:,.0f} img/s")
  rate = scalars.get("train/steps_per_sec")
  if rate and step < total:
    parts.append(f"ETA {format_duration((total - step) / rate)}")
  return "  ".join(parts)


def eval_line(step: int, scalars: Mapping[str, float]) -> str:
  """`eval 938  accuracy 0.9912  loss 0.0301` (the evaluators' scalars, names sorted)."""
  values = [f"{k[len('eval/'):]} {_number(v)}" for k, v in sorted(scalars.items())
            if k.startswith("eval/") and k != "eval/seconds"]
  return "  ".join([f"eval {step}"] + values)


class Console(metrics_lib.MetricWriter):
  """The console of a training run (process 0; silent elsewhere)."""

  def __init__(self, total: int, start: int, enabled: bool = True):
    self._total, self._enabled = total, enabled
    self._bar = None
    if enabled and sys.stderr.isatty() and _log.handlers and not _log.propagate:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            leave=False, file=sys.stderr)

  def advance(self, step: int):
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    if any(k.startswith("train/") for k in scalars):
      _log.info(step_line(step, self._total, scalars))
    if any(k.startswith("eval/") and k != "eval/seconds" for k in scalars):
      _log.info(eval_line(step, scalars))

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def summary(final: Mapping[str, float], out_dir: str, workdir: str):
  """Prints the final metrics and where the run's outputs are."""
  final = {k: float(v) for k, v in final.items()}
  shown = [f"{k} {_number(v)}" for k, v in sorted(final.items())
           if k in ("train/loss", "train/accuracy") or
           (k.startswith("eval/") and k != "eval/seconds")]
  _log.info("done: %s", "  ".join(shown) if shown else "no metrics written")
  rows = [("metrics", os.path.join(out_dir, "metrics.jsonl")),
          ("tensorboard", f"tensorboard --logdir {out_dir}"),
          ("images", os.path.join(out_dir, "images")),
          ("checkpoints", os.path.join(workdir, "checkpoints"))]
  for name, path in rows:
    if name == "tensorboard" or os.path.exists(path):
      _log.info("  %-12s %s", name, path)
