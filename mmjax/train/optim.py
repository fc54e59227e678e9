"""Optimisers and learning-rate schedules from the config's `optimizer` section."""
import ml_collections
import optax


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


def make_optimizer(c: ml_collections.ConfigDict, num_train_steps: int, weight_decay_mask=None):
  """Returns (optax transformation, schedule). `c.name` is "adam", "adamw" or "sgd"."""
  schedule = make_schedule(c, num_train_steps)
  if c.name == "adam":
    tx = optax.adam(schedule, b1=c.b1, b2=c.b2)
  elif c.name == "adamw":
    tx = optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
                     mask=weight_decay_mask)
  elif c.name == "sgd":
    tx = optax.sgd(schedule, momentum=c.b1)
  else:
    raise ValueError(f"config.optimizer.name={c.name!r}: use 'adam', 'adamw' or 'sgd'.")
  if c.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  return tx, schedule
