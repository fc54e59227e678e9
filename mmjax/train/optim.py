"""Optimisers, learning-rate schedules and frozen parameters, from the config."""
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import flatten_util

from mmjax import lora


class Optimizer(NamedTuple):
  """What the train step needs of the optimizer."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  frozen: Any  # Pytree of bools like the parameters: True = frozen.
  flat: bool = False  # config.optimizer.flatten: the update runs on one vector.


def grad_norm(grads, opt: Optimizer) -> jax.Array:
  """The global L2 norm of `grads` (frozen leaves' gradients are zeros).

  With the flat update, the norm of the same concatenation of the trained leaves'
  gradients that `optax.flatten` makes, which XLA then computes once: one reduction
  instead of one per leaf (~420 fewer fused operations in the latent-diffusion
  step, `ldm_throughput.py --compile-only --compile-profile`).
  """
  if not opt.flat:
    return optax.tree.norm(grads)
  trained = [g for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(opt.frozen)) if not f]
  return jnp.linalg.norm(flatten_util.ravel_pytree(trained)[0])


def make_schedule(c: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then `schedule` ("cosine" or "constant")."""
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, c.warmup_steps, max(num_train_steps, c.warmup_steps + 1),
        end_value=c.learning_rate * c.get("end_factor", 0.0))
  if c.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps),
         optax.constant_schedule(c.learning_rate)], [c.warmup_steps])
  raise ValueError(f"config.optimizer.schedule={c.schedule!r}: use 'cosine' or 'constant'.")


def parameter_paths(params) -> list[str]:
  """"a/b/kernel"-style paths of every leaf, in tree order."""
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def frozen_mask(params, patterns, lora_train=()) -> object:
  """Pytree of bools like `params`: True where a leaf's path fully matches a pattern.

  Patterns are regular expressions over "/"-joined paths ("vision/.*",
  "text_tower/encoder/block0/.*"). A pattern that matches nothing is an error: a typo
  must not leave a tower silently trained, and patterns that freeze every leaf leave
  nothing to train: both raise ValueError. A tree with LoRA adapters (mmjax/lora.py)
  trains only them and the leaves matching a `lora_train` pattern (config.lora.train,
  PEFT's `modules_to_save`); every other leaf is frozen too. `patterns` win over
  `lora_train`.
  """
  patterns, lora_train = tuple(patterns or ()), tuple(lora_train or ())
  paths = parameter_paths(params)
  for field, group in (("frozen", patterns), ("lora.train", lora_train)):
    for p in group:
      if not any(re.fullmatch(p, path) for path in paths):
        tops = sorted({path.split("/")[0] for path in paths})
        raise ValueError(f"config.{field} pattern {p!r} matches no parameter; parameter "
                         f"paths look like {paths[0]!r} (top level: {tops}).")
  adapted = any(lora.is_adapter(path) for path in paths)
  flags = [any(re.fullmatch(p, path) for p in patterns)
           or (adapted and not lora.is_adapter(path)
               and not any(re.fullmatch(p, path) for p in lora_train))
           for path in paths]
  if flags and all(flags):
    raise ValueError(f"config.frozen={patterns!r} freezes all {len(paths)} parameters: "
                     f"nothing is left to train. Narrow the patterns so that some train "
                     f"(top level: {sorted({path.split('/')[0] for path in paths})}).")
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def make_optimizer(c: ml_collections.ConfigDict, num_train_steps: int,
                   weight_decay_mask: Callable | None = None, frozen=None):
  """Returns (optax transformation, schedule). `c.name` is "adam", "adamw" or "sgd".

  With `c.flatten`, the clipping and the moments (Adam's, or SGD's momentum) run on
  one vector of all trained parameters (`optax.flatten`), and the weight decay and
  learning rate per leaf: the same update up to float rounding, in a few large
  operations instead of several per leaf. On a CPU, where each operation costs a few
  microseconds whatever its size, that is ~5% faster for the latent-diffusion U-Net
  (250 leaves) and compiles faster (benchmarks/README.md). The optimizer state is then
  one vector per moment: not with mesh.fsdp > 1 (guards.validate), and a checkpoint
  written with one setting does not resume with the other (--eval_only reads either).

  `weight_decay_mask(params) -> bools` picks what AdamW decays. `frozen`, a pytree of
  bools like the parameters (see `frozen_mask`), marks leaves that get no update, no
  optimizer state (no Adam moments) and no weight decay; clipping ignores them.

  `c.layer_decay` (1.0: off) scales each leaf's learning rate by
  layer_decay ** `layer_decay_exponents` (`frozen` gives the tree's paths).
  """
  if c.name not in ("adam", "adamw", "sgd"):
    raise ValueError(f"config.optimizer.name={c.name!r}: use 'adam', 'adamw' or 'sgd'.")
  schedule = make_schedule(c, num_train_steps)
  if c.get("flatten"):
    tx = _flat_optimizer(c, schedule, weight_decay_mask)
  elif c.name == "adam":
    tx = optax.adam(schedule, b1=c.b1, b2=c.b2)
  elif c.name == "adamw":
    tx = optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
                     mask=weight_decay_mask)
  else:
    tx = optax.sgd(schedule, momentum=c.b1)
  decay = c.get("layer_decay")
  if decay is not None and decay != 1.0:
    return _layer_decay_optimizer(c, schedule, weight_decay_mask, frozen), schedule
  if c.get("grad_clip_norm") and not c.get("flatten"):
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  if frozen is not None and any(jax.tree.leaves(frozen)):
    labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def _flat_optimizer(c: ml_collections.ConfigDict, schedule: optax.Schedule,
                    weight_decay_mask: Callable | None) -> optax.GradientTransformation:
  """`c.name`'s update with clipping and moments over one flat vector (`c.flatten`)."""
  moments = (optax.trace(decay=c.b1) if c.name == "sgd" else
             optax.scale_by_adam(b1=c.b1, b2=c.b2))
  clip = [optax.clip_by_global_norm(c.grad_clip_norm)] if c.get("grad_clip_norm") else []
  decay = ([optax.add_decayed_weights(c.weight_decay, weight_decay_mask)]
           if c.name == "adamw" else [])
  return optax.chain(optax.flatten(optax.chain(*clip, moments)), *decay,
                     optax.scale_by_learning_rate(schedule))


_BLOCK = re.compile(r"(.*/)?encoder/block(\d+)/")


def layer_decay_exponents(params) -> object:
  """Pytree of ints like `params`: each leaf's exponent of `layer_decay`.

  A Transformer tower is what holds "encoder/block<i>/..." (ViT, text, CLIP's towers,
  each with its own depth). Within a tower of depth D, as BEiT numbers layers
  (embeddings 0, block i is i + 1, what follows D + 1), the exponent is
  (D + 1) - layer: its embeddings, patch embedding and `ln_pre` D + 1, block i D - i,
  its final LayerNorm 0; leaves outside every tower (projections, logit scale) 0.
  LoRA adapters sit in their kernel's module and count as its layer. Raises ValueError
  for a scanned encoder ("encoder/blocks/", one leaf for every layer) or a tree
  without Transformer blocks.
  """
  paths = parameter_paths(params)
  if any("encoder/blocks/" in p for p in paths):
    raise ValueError("config.optimizer.layer_decay needs one leaf per layer: set "
                     "config.scan_layers=False (a scanned encoder stacks every block).")
  depth = {}
  for p in paths:
    m = _BLOCK.match(p)
    if m:
      tower = m.group(1) or ""
      depth[tower] = max(depth.get(tower, 0), int(m.group(2)) + 1)
  if not depth:
    raise ValueError("config.optimizer.layer_decay: the model has no Transformer blocks "
                     "(parameters 'encoder/block<i>/...') to decay; set it to 1.0.")

  def exponent(path):
    m = _BLOCK.match(path)
    if m:
      return depth[m.group(1) or ""] - int(m.group(2))
    for tower, d in depth.items():
      if path.startswith(tower) and not path.startswith(tower + "encoder/"):
        return d + 1  # Before the blocks: embeddings, ln_pre.
    return 0

  return jax.tree.unflatten(jax.tree.structure(params), [exponent(p) for p in paths])


def _layer_decay_optimizer(c, schedule, weight_decay_mask, frozen):
  """`c.name`'s update with each leaf's learning rate scaled by c.layer_decay **
  exponent: an optax.multi_transform over one group per exponent (and the frozen
  leaves' set_to_zero), after clipping by the trained leaves' global norm."""
  if frozen is None:
    raise ValueError("config.optimizer.layer_decay needs the parameter tree (pass frozen=).")
  if c.get("flatten"):
    raise ValueError("config.optimizer.layer_decay scales the rate per leaf: set "
                     "config.optimizer.flatten=False.")
  exponents = layer_decay_exponents(frozen)
  labels = jax.tree.map(lambda f, e: "frozen" if f else f"decay^{e}", frozen, exponents)
  groups = {"frozen": optax.set_to_zero()}
  for e in sorted({e for e, f in zip(jax.tree.leaves(exponents), jax.tree.leaves(frozen))
                   if not f}):
    lr = lambda step, f=c.layer_decay ** e: schedule(step) * f
    if c.name == "adam":
      groups[f"decay^{e}"] = optax.adam(lr, b1=c.b1, b2=c.b2)
    elif c.name == "adamw":
      groups[f"decay^{e}"] = optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
                                         mask=weight_decay_mask)
    else:
      groups[f"decay^{e}"] = optax.sgd(lr, momentum=c.b1)
  tx = optax.multi_transform(groups, labels)
  if c.get("grad_clip_norm"):
    trained = jax.tree.map(lambda f: not f, frozen)
    tx = optax.chain(optax.masked(optax.clip_by_global_norm(c.grad_clip_norm), trained), tx)
  return tx
