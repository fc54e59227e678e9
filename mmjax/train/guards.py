"""Guards a run needs before it compiles anything: config values and the config record.

`validate(config)` refuses values that would waste a run (a cadence of 0, no checkpoint
kept, a NaN or negative learning rate, a dtype or remat policy mmjax does not know, a
dataset TFDS does not know) with one message naming every bad field and what to set.

`check_restart(config, workdir, step)` compares a restart's config with the one the
first run wrote into `<workdir>/config.json`. Fields that change the experiment (task,
model, dataset, batch, optimizer, schedule, seed, ...) are refused with a diff of the
fields; fields that are safe to change (cadences, evaluation batch, where data is read)
are allowed and the config in force is recorded as `<workdir>/config.<step>.json`.
`num_train_steps` may change only with `--config.allow_schedule_change` (a cosine
schedule is stretched by it). `config.json` itself is never rewritten once a checkpoint
exists.
"""
import difflib
import fnmatch
import functools
import json
import math
import os

import ml_collections


class ConfigError(ValueError):
  """A config value or a config change that mmjax refuses; the message says what to set."""


# Dotted field names (fnmatch patterns) that may change between a run and its restart.
SAFE_TO_CHANGE = (
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "eval_batch_size", "evals.*.every_steps", "dataset.data_dir", "dataset.download",
    "dataset.cache_decoded", "max_loss", "allow_schedule_change", "profile_steps",
    "peak_tflops_per_device", "mesh.*", "fsdp_min_size", "grad_accum_steps", "remat",
    "reuse_host_memory",
)
# Fields (dotted names) added to configs after runs were written: a config.json
# without one is compared as if it held this value (and so is a config without one),
# so that those runs still restart.
ADDED_FIELDS = {"dtype": "float32", "param_dtype": "float32", "remat": "none",
                "scan_layers": False, "model.dropout_rate": 0.0, "reuse_host_memory": True,
                "optimizer.flatten": False, "optimizer.layer_decay": 1.0, "lora.rank": 0,
                "lora.alpha": 0.0, "lora.targets": [], "lora.dropout": 0.0,
                "warm_start.workdir": "", "warm_start.include": [".*"],
                "warm_start.reinit": [], "model.patch_dropout": 0.0}
# Fields that may change only with config.allow_schedule_change=True.
SCHEDULE_FIELDS = ("num_train_steps",)
_CADENCES = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps")


def flatten(tree, prefix: str = "") -> dict:
  """{"optimizer.learning_rate": 0.001, ...} from nested dicts (JSON-like values)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def as_json_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as `config.json` holds it (tuples become lists, and so on)."""
  return json.loads(config.to_json_best_effort())


@functools.lru_cache(maxsize=1)
def _tfds_names() -> frozenset[str]:
  import tensorflow_datasets as tfds  # Slow to import: only when a name is checked.
  return frozenset(tfds.list_builders(with_community_datasets=False))


def check_dataset_name(name: str, data_dir: str | None = None):
  """Raises ConfigError with a "did you mean" if TFDS has no dataset `name`.

  A name prepared in the data directory (a dataset of one's own) is accepted too.
  """
  from mmjax.data import pipeline  # Only resolve_data_dir: no data is read.
  base = name.split(":")[0].split("/")[0]
  if base in _tfds_names() or os.path.isdir(
      os.path.join(pipeline.resolve_data_dir(data_dir), base)):
    return
  close = difflib.get_close_matches(base, sorted(_tfds_names()), n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else (
      "see tfds.list_builders() for the names.")
  raise ConfigError(f"config.dataset.name={name!r} is not a TFDS dataset: {hint}")


def validate(config: ml_collections.ConfigDict, *, check_dataset: bool = True):
  """Raises one ConfigError naming every bad value of a training config.

  Checks: every cadence (`*_every_steps`, `evals.*.every_steps`) >= 1,
  keep_checkpoints >= 1, num_train_steps >= 1, global_batch_size >= 1,
  grad_accum_steps >= 1, fsdp_min_size >= 1, the learning rate finite and >= 0,
  max_loss (if set) a number, dtype and param_dtype among
  mmjax.nn.precision.DTYPES, remat among its REMAT_CHOICES, scan_layers a bool,
  optimizer.flatten only with mesh.fsdp 1, and the dataset name.
  """
  from mmjax.nn import precision  # Imports flax: only when a config is validated.
  bad = []

  def need(ok, field, value, what):
    if not ok:
      bad.append(f"config.{field}={value!r} ({what})")

  for f in _CADENCES + ("keep_checkpoints", "num_train_steps", "global_batch_size",
                        "grad_accum_steps", "fsdp_min_size"):
    if f in config:
      v = config[f]
      need(isinstance(v, int) and v >= 1, f, v, "must be an integer >= 1")
  for name, ev in (config.get("evals") or {}).items():
    v = ev.get("every_steps")
    if v is not None:
      need(isinstance(v, int) and v >= 1, f"evals.{name}.every_steps", v, "must be >= 1")
  opt = config.get("optimizer")
  if opt is not None and "learning_rate" in opt:
    lr = opt.learning_rate
    need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0,
         "optimizer.learning_rate", lr, "must be finite and >= 0; a negative rate "
         "would climb the loss")
  for f in ("dtype", "param_dtype"):
    if f in config:
      need(config[f] in precision.DTYPES, f, config[f],
           f"use {', '.join(map(repr, precision.DTYPES))}")
  if "remat" in config:
    need(config.remat in precision.REMAT_CHOICES, "remat", config.remat,
         f"use 'none', 'full' or one of {', '.join(precision.REMAT_POLICIES)}")
  if "scan_layers" in config:
    need(isinstance(config.scan_layers, bool), "scan_layers", config.scan_layers,
         "True or False")
  if opt is not None and opt.get("flatten"):
    fsdp = (config.get("mesh") or {}).get("fsdp", 1)
    need(fsdp == 1, "optimizer.flatten", True, f"one flat optimizer state cannot be split "
         f"by leaf over config.mesh.fsdp={fsdp}: set optimizer.flatten=False with fsdp")
  max_loss = config.get("max_loss")
  if max_loss is not None:
    need(isinstance(max_loss, (int, float)) and not math.isnan(max_loss), "max_loss",
         max_loss, "a number, or None for no limit")
  if bad:
    raise ConfigError("Bad config: " + "; ".join(bad) + ".")
  dataset = config.get("dataset")
  if check_dataset and dataset is not None and dataset.get("name"):
    check_dataset_name(dataset.name, dataset.get("data_dir"))


def _diff_line(field, old, new) -> str:
  return f"{field}: {old!r} -> {new!r}"


def check_restart(config: ml_collections.ConfigDict, workdir: str, step: int | None,
                  *, write: bool = True) -> dict[str, tuple]:
  """Compares `config` with `<workdir>/config.json`; records it; returns the changes.

  `step` is the checkpoint the run resumes from, or None for a fresh start: then
  `config.json` is (re)written and nothing is compared. On a restart, a change of any
  field outside SAFE_TO_CHANGE raises ConfigError (config.json stays as it was); safe
  changes are written to `config.<step>.json`. `num_train_steps` must stay above `step`.

  Returns {field: (old, new)} of the allowed changes.
  """
  path = os.path.join(workdir, "config.json")
  new = as_json_dict(config)
  if step is None or not os.path.exists(path):
    if write:
      with open(path, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    return {}
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  a, b = ({**ADDED_FIELDS, **flatten(old)}, {**ADDED_FIELDS, **flatten(new)})
  changed = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
             if a.get(k) != b.get(k)}
  safe = lambda k: any(fnmatch.fnmatchcase(k, p) for p in SAFE_TO_CHANGE)
  refused = {k: v for k, v in changed.items() if not safe(k) and k not in SCHEDULE_FIELDS}
  if refused:
    lines = [_diff_line(k, *v) for k, v in refused.items()]
    shown = "; ".join(lines[:8]) + (f"; and {len(lines) - 8} more" if len(lines) > 8 else "")
    raise ConfigError(
        f"The config differs from the one that started {workdir} (config.json) in fields "
        f"that change the experiment: {shown}. Restore them, or use a new --workdir.")
  n = config.num_train_steps
  if "num_train_steps" in changed and not config.get("allow_schedule_change"):
    raise ConfigError(
        f"config.num_train_steps changed from {changed['num_train_steps'][0]} to {n} since "
        f"{workdir} started; that reshapes the learning-rate schedule. Add "
        f"--config.allow_schedule_change=True to accept it, or restore it.")
  if n <= step:
    raise ConfigError(
        f"config.num_train_steps={n} but {workdir} already has a checkpoint at step "
        f"{step}: nothing to train. Set --config.num_train_steps above {step} (with "
        f"--config.allow_schedule_change=True), or use a new --workdir.")
  if changed and write:
    with open(os.path.join(workdir, f"config.{step}.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  return changed
