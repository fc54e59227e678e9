"""Guards a run needs before it compiles anything: config values and the config record.

`validate(config)` refuses values that would waste a run (a cadence of 0, no checkpoint
kept, a NaN or negative learning rate, a dtype or remat policy mmjax does not know, a
dataset TFDS does not know) with one message naming every bad field and what to set.

`check_restart(config, workdir, step)` compares a restart's config with the one that
wrote its checkpoint (the copy saved inside the checkpoint, checked against
`<workdir>/config.json` and its `config.<step>.json` records). Fields that change the
experiment (task, model, dataset, batch, optimizer, schedule, seed, ...) are refused
with a diff of the fields; fields that are safe to change (cadences, evaluation batch,
where data is read) are allowed and the config in force is recorded as
`<workdir>/config.<step>.json`. `num_train_steps` may change only with
`--config.allow_schedule_change` (a cosine schedule is stretched by it); the optimizer
values in RESUMABLE (learning rate, clipping, ...) only when named in
`--config.resume_changes` (recovering from a loss spike). `config.json` itself is never
rewritten once a checkpoint exists, except restored from the checkpoint's copy when it
is missing.
"""
import difflib
import fnmatch
import functools
import json
import logging
import math
import os
import re

import ml_collections

from mmjax import configs


class ConfigError(ValueError):
  """A config value or a config change that mmjax refuses; the message says what to set."""


# Dotted field names (fnmatch patterns) that may change between a run and its restart.
SAFE_TO_CHANGE = (
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "eval_batch_size", "evals.*.every_steps", "dataset.data_dir", "dataset.download",
    "dataset.cache_decoded", "max_loss", "allow_schedule_change", "profile_steps",
    "peak_tflops_per_device", "mesh.*", "fsdp_min_size", "grad_accum_steps", "remat",
    "reuse_host_memory", "resume_changes",
)
# Fields that may change on a restart when named in config.resume_changes: they keep
# the parameters' and optimizer state's shapes (recovery from a loss spike).
RESUMABLE = (
    "optimizer.learning_rate", "optimizer.grad_clip_norm", "optimizer.weight_decay",
    "optimizer.warmup_steps", "optimizer.end_factor", "optimizer.schedule",
    "optimizer.b1", "optimizer.b2",
)
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
  from mmjax.data import sources  # Only resolve_data_dir: no data is read.
  base = name.split(":")[0].split("/")[0]
  if base in _tfds_names() or os.path.isdir(
      os.path.join(sources.resolve_data_dir(data_dir), base)):
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
  optimizer.flatten only with mesh.fsdp 1, resume_changes naming RESUMABLE fields
  only, and the dataset name.
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
  bad.extend(optimizer_range_problems(config))
  bad.extend(frozen_pattern_problems(config))
  try:
    parse_resume_changes(config)
  except ConfigError as e:
    bad.append(str(e).rstrip("."))
  if bad:
    raise ConfigError("Bad config: " + "; ".join(bad) + ".")
  dataset = config.get("dataset")
  if check_dataset and dataset is not None and dataset.get("name"):
    check_dataset_name(dataset.name, dataset.get("data_dir"))


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def optimizer_range_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The optimizer values out of range, each as "config.<field>=<value> (<what to set>)".

  warmup_steps an integer >= 0; grad_clip_norm, weight_decay and end_factor finite and
  >= 0 (a negative clip norm turns descent into ascent, a negative decay grows the
  weights); b1 and b2 in [0, 1) (Adam's moment decays; b1 is SGD's momentum).
  """
  opt = config.get("optimizer")
  if opt is None:
    return []
  bad = []
  if "warmup_steps" in opt:
    v = opt.warmup_steps
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
      bad.append(f"config.optimizer.warmup_steps={v!r} (must be an integer >= 0)")
  for f, what in (("grad_clip_norm", "0 for no clipping; a negative norm reverses the "
                   "gradients"), ("weight_decay", "a negative decay grows the weights"),
                  ("end_factor", "the final learning rate as a fraction of the peak")):
    if f in opt and opt[f] is not None:
      v = opt[f]
      if not (_is_number(v) and v >= 0):
        bad.append(f"config.optimizer.{f}={v!r} (must be finite and >= 0; {what})")
  for f in ("b1", "b2"):
    if f in opt and opt[f] is not None:
      v = opt[f]
      if not (_is_number(v) and 0 <= v < 1):
        bad.append(f"config.optimizer.{f}={v!r} (must be in [0, 1), e.g. 0.9 for b1 and "
                   "0.999 for b2)")
  return bad


def frozen_pattern_problems(config: ml_collections.ConfigDict) -> list[str]:
  """config.frozen entries that are not strings or not valid regular expressions.

  Whether the patterns leave anything to train needs the parameters' paths:
  mmjax.train.optim.frozen_mask checks that, before compiling the step.
  """
  patterns = config.get("frozen") or ()
  if isinstance(patterns, str):
    return [f"config.frozen={patterns!r} (a tuple of regular expressions, e.g. "
            f"({patterns!r},))"]
  bad = []
  for p in patterns:
    if not isinstance(p, str):
      bad.append(f"config.frozen pattern {p!r} (must be a string, a regular expression "
                 "over parameter paths such as 'vision/.*')")
      continue
    try:
      re.compile(p)
    except re.error as e:
      bad.append(f"config.frozen pattern {p!r} is not a regular expression ({e}); "
                 "e.g. 'vision/.*'")
  return bad


def _diff_line(field, old, new) -> str:
  return f"{field}: {old!r} -> {new!r}"


def parse_resume_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The fields named by `config.resume_changes` ("a.b,c.d"); ConfigError for one
  outside RESUMABLE (those are the only ones whose change keeps the state's layout)."""
  value = config.get("resume_changes") or ""
  names = tuple(n.strip() for n in str(value).split(",") if n.strip())
  bad = [n for n in names if n not in RESUMABLE]
  if bad:
    raise ConfigError(
        f"config.resume_changes names {', '.join(bad)}: only {', '.join(RESUMABLE)} may "
        f"change on a restart (they keep the parameters' and optimizer state's shapes); "
        f"for anything else use a new --workdir.")
  return names


def _config_records(workdir: str) -> list[tuple[int, str]]:
  """(step, path) of each `config.<step>.json` in `workdir`, by step."""
  out = []
  for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
    m = re.fullmatch(r"config\.(\d+)\.json", name)
    if m:
      out.append((int(m.group(1)), os.path.join(workdir, name)))
  return sorted(out)


def _read_record(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is damaged ({type(e).__name__}: {e}); put back a copy "
                      f"of it, or use a new --workdir.") from None
  if not isinstance(record, dict):
    raise ConfigError(f"{path} is not a config (a JSON object); put back a copy of it, "
                      f"or use a new --workdir.")
  return record


def record_in_force(workdir: str, step: int) -> tuple[str, dict | None]:
  """(path, config) of the record that wrote the checkpoint at `step`: the latest
  `config.<s>.json` with s < step (a restart from s records its config there), else
  `config.json`; (path of config.json, None) when that is missing."""
  path = os.path.join(workdir, "config.json")
  for s, p in reversed(_config_records(workdir)):
    if s < step:
      path = p
      break
  if not os.path.exists(path):
    return path, None
  return path, _read_record(path)


def _unsafe_diff(old: dict, new: dict, allowed=()) -> dict[str, tuple]:
  """{field: (old, new)} of the flattened fields that differ, outside SAFE_TO_CHANGE,
  SCHEDULE_FIELDS and the fnmatch patterns in `allowed`."""
  a, b = flatten(old), flatten(new)
  ok = SAFE_TO_CHANGE + SCHEDULE_FIELDS + tuple(allowed)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
          if a.get(k) != b.get(k) and not any(fnmatch.fnmatchcase(k, p) for p in ok)}


def _shown(diff: dict[str, tuple]) -> str:
  lines = [_diff_line(k, *v) for k, v in diff.items()]
  return "; ".join(lines[:8]) + (f"; and {len(lines) - 8} more" if len(lines) > 8 else "")


def _reference(workdir: str, step: int, saved: dict | None, saved_path: str,
               write: bool) -> tuple[str, dict]:
  """(where, config) that the checkpoint at `step` was written with.

  `saved` is the copy inside the checkpoint (None for one written by an older mmjax).
  A missing `config.json` is restored from it (with a warning); a record that differs
  from it in fields that change the experiment is refused; neither: refused.
  """
  path, record = record_in_force(workdir, step)
  if saved is None:
    if record is None:
      raise ConfigError(
          f"{path} is missing and the checkpoint at step {step} carries no config (an "
          f"older mmjax wrote it): nothing says which config made it. Put config.json "
          f"back, or use a new --workdir.")
    return path, record
  if record is None:
    if write and path.endswith(os.sep + "config.json"):
      tmp = f"{path}.tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2)
      os.replace(tmp, path)
      logging.warning("%s was missing: restored from the copy saved with the checkpoint "
                      "at step %d (%s).", path, step, saved_path)
    return saved_path, saved
  differ = _unsafe_diff(record, saved)
  if differ:
    raise ConfigError(
        f"{path} does not match the config saved with the checkpoint at step {step} "
        f"({saved_path}): {_shown(differ)}. Was it edited, or copied from another run? "
        f"Put back the checkpoint's copy, or use a new --workdir.")
  return saved_path, saved


def _with_defaults(old: dict, new_flat: dict) -> dict:
  """`old` (a reference config) with each field it lacks set to `configs.base_config()`'s
  default where this config holds that default: a field is added with the default that
  keeps what runs did before it, so an older run did exactly that."""
  defaults = flatten(as_json_dict(configs.base_config()))
  old = json.loads(json.dumps(old))
  have = flatten(old)
  for key, value in new_flat.items():
    if key in have or key not in defaults or defaults[key] != value:
      continue
    node, *parts = old, *key.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        break
    else:
      node[parts[-1]] = value
  return old


def check_restart(config: ml_collections.ConfigDict, workdir: str, step: int | None,
                  *, write: bool = True, saved: dict | None = None,
                  saved_path: str = "the checkpoint", evaluating: bool = False
                  ) -> dict[str, tuple]:
  """Compares `config` with the config that wrote the checkpoint at `step`; records
  it; returns the changes.

  `step` is the checkpoint the run resumes from, or None for a fresh start: then
  `config.json` is (re)written and nothing is compared. On a restart the reference is
  the checkpoint's own copy of its config (`saved`, from `saved_path`), checked against
  the workdir's record (`_reference`: a missing `config.json` is restored from the
  copy, a different one refused); a checkpoint without a copy (an older mmjax) is
  compared with the record. A change of any field outside SAFE_TO_CHANGE raises
  ConfigError (config.json stays as it was), and so does a field outside it that the
  reference lacks (a run of an older mmjax) unless it holds `configs.base_config()`'s
  default (what runs did before the field existed), except the RESUMABLE fields named in
  `config.resume_changes` (lowering the learning rate after a NaN stop). Allowed
  changes are written to `config.<step>.json`. `num_train_steps` must stay above
  `step`. `evaluating` (--eval_only): evaluator fields and the schedule may differ
  too, the RESUMABLE fields need no opt-in, and nothing is written.

  Returns {field: (old, new)} of the allowed changes.
  """
  path = os.path.join(workdir, "config.json")
  new = as_json_dict(config)
  if step is None:
    if write:
      with open(path, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    return {}
  opted = RESUMABLE + ("evals.*",) if evaluating else parse_resume_changes(config)
  where, old = _reference(workdir, step, saved, saved_path, write and not evaluating)
  old = _with_defaults(old, flatten(new))
  a, b = flatten(old), flatten(new)
  safe = lambda k: any(fnmatch.fnmatchcase(k, p) for p in SAFE_TO_CHANGE + opted)
  missing = sorted(k for k in b.keys() - a.keys() if not safe(k))
  if missing:
    raise ConfigError(
        f"{where} has no field {', '.join(missing)}: it was written by an older mmjax "
        f"whose config lacked it. Use a new --workdir.")
  changed = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
             if a.get(k) != b.get(k)}
  refused = _unsafe_diff(old, new, opted)
  if refused:
    if evaluating:
      raise ConfigError(
          f"--eval_only: the config differs from the one that wrote the checkpoint at "
          f"step {step} of {workdir} ({where}) in fields that change the experiment: "
          f"{_shown(refused)}. Evaluate with the config it was trained with.")
    resumable = [k for k in refused if k in RESUMABLE]
    hint = (f", or accept them with --config.resume_changes={','.join(resumable)}"
            if len(resumable) == len(refused) else
            f" (only {', '.join(RESUMABLE)} may change, with --config.resume_changes)")
    raise ConfigError(
        f"The config differs from the one that wrote the checkpoint at step {step} of "
        f"{workdir} ({where}) in fields that change the experiment: {_shown(refused)}. "
        f"Restore them, or use a new --workdir{hint}.")
  clip = changed.get("optimizer.grad_clip_norm")
  if clip and bool(clip[0]) != bool(clip[1]):
    raise ConfigError(
        f"config.optimizer.grad_clip_norm: {clip[0]!r} -> {clip[1]!r} turns clipping "
        f"{'on' if clip[1] else 'off'}, which changes the optimizer state's layout; "
        f"resume with another non-zero norm, or use a new --workdir.")
  if evaluating:
    return changed
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
    tmp = os.path.join(workdir, f"config.{step}.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, f"config.{step}.json"))
  return changed
