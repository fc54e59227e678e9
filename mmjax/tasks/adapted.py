"""Fine-tuning any task: start from another run's weights, and train LoRA adapters.

`tasks.get_task` wraps a task in `AdaptedTask` when the config asks for either:

  config.warm_start = dict(workdir="", include=(".*",), reinit=(), source="params")
    workdir: a run's workdir; the parameters whose paths match `include` start from
      its latest checkpoint (with that run's LoRA adapters merged in), the others as
      the task would start them (random, or `config.init_from`'s). Extras (an EMA)
      come from the run too where their shapes are the task's.
    source: "params", or an extra of the run holding weights ("ema"): the parameters
      start from that run's EMA, as a released diffusion model's weights are its EMA.
    reinit: parameters that start from the task's random initialisation even when
      loaded (a text tower from scratch beside a loaded image tower).
  config.lora = dict(rank=8, alpha=16, targets=(regexes over kernel paths,), dropout=0.0)
    adapters beside the matching kernels (mmjax/lora.py); only they train.

The wrapped task keeps the inner task's interface: every method that takes the
parameters first (`loss`, `embed_for_loss`, `loss_from_embeddings`, and what
evaluators call: `embed`, `logits`, `sample`, ...) gets them with the adapters merged
into the kernels, so neither the model nor the inner task knows about LoRA. The
parameters, the optimizer state and the checkpoints hold the base (frozen: no
optimizer state) and the adapters. An extra shaped like the parameters (an EMA) gets
the same adapters: the EMA averages the adapters and keeps the frozen base as it is,
and the evaluation methods see it merged too (the training methods pass extras
through). Bad settings fail in `setup()`, before anything compiles. See docs/lora.md.
"""
import functools
import inspect
import os
import re

import jax

from mmjax import lora
from mmjax import runs


def wanted(config) -> bool:
  """Whether `config` asks for LoRA or a warm start."""
  ws = config.get("warm_start") or {}
  return bool(lora.spec_from_config(config) or ws.get("workdir") or ws.get("reinit"))


def _paths(tree) -> dict[str, object]:
  return {"/".join(k): x for k, x in lora._flat(tree).items()}  # pylint: disable=protected-access


def _replace(params, source, patterns, field: str):
  """`params` with the leaves whose paths match `patterns` taken from `source`."""
  dst, src = _paths(params), _paths(source)
  for path in dst:
    if not any(re.fullmatch(p, path) for p in patterns):
      continue
    if path not in src or src[path].shape != dst[path].shape:
      found = "missing" if path not in src else f"of shape {tuple(src[path].shape)}"
      raise ValueError(f"config.{field}: {path!r} of shape {tuple(dst[path].shape)} is "
                       f"{found} there: give the same model config as that run, or narrow "
                       f"the patterns.")
    dst[path] = src[path]
  return lora._unflat({tuple(k.split("/")): v for k, v in dst.items()})  # pylint: disable=protected-access


# Task methods that return the extras they are given: those get them as stored.
_PASS_EXTRAS = frozenset({"loss", "embed_for_loss", "loss_from_embeddings"})


def _check_patterns(paths, patterns, field: str):
  for p in patterns:
    if not any(re.fullmatch(p, path) for path in paths):
      raise ValueError(f"config.{field} pattern {p!r} matches no parameter; parameter paths "
                       f"look like {next(iter(paths))!r}.")


class AdaptedTask:
  """`task` with a warm start and/or LoRA adapters (see the module's docstring)."""

  def __init__(self, task, config):
    self.inner = task
    self.config = config
    self.spec = lora.spec_from_config(config)
    ws = config.get("warm_start") or {}
    self.workdir = ws.get("workdir") or ""
    self.include = tuple(ws.get("include") or (".*",))
    self.reinit = tuple(ws.get("reinit") or ())
    self.source = ws.get("source") or "params"

  def __getattr__(self, name):
    value = getattr(self.inner, name)
    if not inspect.ismethod(value):
      return value

    @functools.wraps(value)
    def with_merged_params(*args, **kwargs):
      if args and lora.has_adapters(args[0]):
        args = (self.merged(args[0]),) + args[1:]
        if name not in _PASS_EXTRAS and len(args) > 1 and isinstance(args[1], dict):
          args = args[:1] + ({k: self.merged(v) for k, v in args[1].items()},) + args[2:]
      return value(*args, **kwargs)

    return with_merged_params

  def merged(self, params):
    """The inner task's parameters: the adapters folded into their kernels."""
    return lora.merge(params, self.spec.scale) if self.spec else params

  @property
  def batch_coupled(self):
    return self.inner.batch_coupled

  def setup(self):
    """The inner task's setup, then `check()`."""
    self.inner.setup()
    self.check()

  def check(self):
    """Every check that needs the parameters' paths (no compilation): patterns that
    match nothing, ranks above a kernel's smaller side. After the inner setup."""
    if self.workdir and not os.path.exists(os.path.join(self.workdir, "config.json")):
      raise FileNotFoundError(f"config.warm_start.workdir={self.workdir!r} holds no run (no "
                              f"config.json): train that run first.")
    try:
      abstract = jax.eval_shape(self.inner.init, jax.random.PRNGKey(0))[0]
    except NotImplementedError:  # A task that only loads its weights (sd).
      abstract = jax.eval_shape(lambda p: p, self.inner.pretrained()[0])
    paths = _paths(abstract)
    if self.workdir:
      _check_patterns(paths, self.include, "warm_start.include")
      if self.source != "params":
        run = runs.load_run(self.workdir, field="warm_start.workdir")
        if self.source not in (run.extras or {}):
          raise ValueError(f"config.warm_start.source={self.source!r}: the run in "
                           f"{self.workdir} has no such extra (it has "
                           f"{sorted(run.extras or {})}); use 'params' or one of those.")
    if self.reinit:
      if not self.workdir and self.inner.pretrained() is None:
        raise ValueError("config.warm_start.reinit re-initialises loaded parameters, but "
                         "nothing is loaded: set config.warm_start.workdir or "
                         "config.init_from.")
      _check_patterns(paths, self.reinit, "warm_start.reinit")
    if self.spec:
      lora.target_kernels(abstract, self.spec)

  def _with_adapters(self, params, extras, rng):
    """Adapters (from `rng`) beside the kernels of `params` and of each extra of the
    same structure (an EMA), so the EMA's adapters start equal to the parameters'."""
    like = lambda t: (jax.tree.structure(t) == jax.tree.structure(params) and
                      jax.tree.map(jax.numpy.shape, t) == jax.tree.map(jax.numpy.shape, params))
    extras = {k: lora.add_adapters(v, self.spec, rng) if like(v) else v
              for k, v in extras.items()}
    return lora.add_adapters(params, self.spec, rng), extras

  def init(self, rng):
    params, extras = self.inner.init(rng)
    if self.spec:
      params, extras = self._with_adapters(params, extras, jax.random.fold_in(rng, 1))
    return params, extras

  def pretrained(self):
    """The inner task's loaded weights, warm-started from `warm_start.workdir`, some
    re-initialised, with adapters: NumPy on the host; None if nothing is loaded."""
    loaded = self.inner.pretrained()
    if loaded is None and not self.workdir:
      return None  # `init` makes everything, adapters included.
    key = jax.random.PRNGKey(self.config.seed)  # The trainer's initialisation key.
    init = jax.jit(self.inner.init)
    params, extras = loaded if loaded is not None else jax.device_get(init(key))
    if self.workdir:
      run = runs.load_run(self.workdir, field="warm_start.workdir")
      source = run.merged(run.params if self.source == "params" else run.extras[self.source])
      params = _replace(params, jax.device_get(source), self.include, "warm_start.include")
      run_extras = {k: run.merged(v) for k, v in (run.extras or {}).items()}
      shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
      try:
        if jax.tree.structure(run_extras) == jax.tree.structure(extras) and (
            shapes(run_extras) == shapes(extras)):
          extras = jax.device_get(run_extras)
      except ValueError:
        pass
    if self.reinit:
      params = _replace(params, jax.device_get(init(key)[0]), self.reinit,
                        "warm_start.reinit")
    if self.spec:
      params, extras = jax.device_get(jax.jit(self._with_adapters)(
          params, extras, jax.random.fold_in(key, 1)))
    return params, extras

  def after_update(self, state):
    """The inner task's (an EMA of the weights), on the parameters with their adapters
    (the EMA has them too), so the frozen base stays as the EMA holds it."""
    return self.inner.after_update(state)

  def weight_decay_mask(self, params):
    return self.inner.weight_decay_mask(params)
