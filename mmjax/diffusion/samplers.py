"""Reverse samplers: DDPM ancestral and DDIM, with classifier-free guidance.

A model function maps (x_t [b, h, w, c], t [b] int, context [b, tokens, width]) to a
prediction [b, h, w, c] of type "eps", "v" or "x0". With guidance, it is called once
per step on a doubled batch: [conditional context; unconditional context], and the two
halves are combined as uncond + scale·(cond − uncond).

Both samplers walk a decreasing subsequence of the T training timesteps; the step
from t to the previous kept timestep t' (ab' = 1 after the last) is

  DDIM (Song et al. 2021): x' = sqrt(ab')·x0 + sqrt(1 − ab' − σ²)·eps + σ·z,
      σ = eta·sqrt((1 − ab')/(1 − ab))·sqrt(1 − ab/ab'),
  DDPM (Ho et al. 2020), with the respaced beta = 1 − ab/ab': the posterior
      q(x' | x_t, x0) mean + sqrt(posterior variance)·z,

which coincide for eta = 1. The loop is one `lax.scan`; the guidance scale is an array
argument, so jitting `sample` with a new scale reuses the compiled loop.
"""
from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.diffusion.schedules import Schedule, x0_eps_from_prediction

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
METHODS = ("ddim", "ddpm")


def sampling_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
  """[num_steps] decreasing int timesteps, evenly spaced and starting at T − 1.

  The "trailing" spacing of Lin et al. 2024: round(T − i·T/num_steps) − 1, i = 0..n−1,
  so sampling starts from the noisiest timestep; num_steps = T gives T−1, ..., 0.
  """
  if not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_timesteps}].")
  steps = num_train_timesteps - np.arange(num_steps) * (num_train_timesteps / num_steps)
  return np.round(steps).astype(np.int32) - 1


def guided_prediction(model_fn: ModelFn, x_t: jax.Array, t: jax.Array, context: jax.Array,
                      uncond_context: jax.Array | None = None, guidance_scale=1.0) -> jax.Array:
  """Classifier-free guidance with one model call on a doubled batch.

  Args:
    model_fn: (x_t, t, context) -> prediction.
    x_t: [b, h, w, c].
    t: [b] int.
    context: [b, tokens, width], the conditioning.
    uncond_context: [b or 1, tokens, width], the empty conditioning; None: no guidance,
      one call on the batch itself.
    guidance_scale: scalar or [b]; 1 gives the conditional prediction.

  Returns:
    [b, h, w, c]: uncond + scale·(cond − uncond).
  """
  if uncond_context is None:
    return model_fn(x_t, t, context)
  b = x_t.shape[0]
  uncond_context = jnp.broadcast_to(uncond_context, (b,) + uncond_context.shape[1:])
  out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                 jnp.concatenate([context, uncond_context.astype(context.dtype)]))
  cond, uncond = out[:b], out[b:]
  scale = jnp.asarray(guidance_scale, out.dtype)
  scale = scale.reshape(scale.shape + (1,) * (out.ndim - scale.ndim))
  return uncond + scale * (cond - uncond)


def _step(x_t, x0, eps, ab, ab_prev, noise, method, eta):
  """One reverse step x_t -> x_{t'}; ab, ab_prev are [b, 1, 1, 1] (ab_prev = 1 at the end)."""
  if method == "ddim":
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    direction = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0))
    return jnp.sqrt(ab_prev) * x0 + direction * eps + sigma * noise
  beta = 1 - ab / ab_prev  # The respaced beta between the two kept timesteps.
  mean = (jnp.sqrt(ab_prev) * beta * x0 + jnp.sqrt(1 - beta) * (1 - ab_prev) * x_t) / (1 - ab)
  variance = beta * (1 - ab_prev) / (1 - ab)  # Zero at the last step.
  return mean + jnp.sqrt(variance) * noise


def sample(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array,
           context: jax.Array, uncond_context: jax.Array | None = None, guidance_scale=1.0, *,
           num_steps: int = 50, method: str = "ddim", eta: float | jax.Array = 0.0,
           prediction_type: str = "eps", clip_x0: float | None = None) -> jax.Array:
  """Runs the reverse process from x_T; pure and traceable (jit it, or call `make_sampler`).

  Args:
    model_fn: (x_t [b,h,w,c], t [b] int, context [b,tokens,width]) -> [b,h,w,c].
    schedule: the noise schedule the model was trained with.
    x_T: [b, h, w, c] standard normal start.
    rng: key for the per-step noise z (unused by DDIM with eta = 0).
    context: [b, tokens, width].
    uncond_context: [b or 1, tokens, width] for classifier-free guidance, or None.
    guidance_scale: scalar or [b]; may be traced.
    num_steps: number of model evaluations (a subsequence of the T timesteps); static.
    method: "ddim" or "ddpm"; static.
    eta: DDIM's noise level (0: deterministic, 1: DDPM's variance); may be traced.
    prediction_type: what model_fn predicts: "eps", "v" or "x0"; static.
    clip_x0: if set, the predicted x0 is clipped to [−clip_x0, clip_x0] (pixel space).

  Returns:
    [b, h, w, c] samples x_0.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}: use one of {METHODS}.")
  steps = sampling_timesteps(schedule.num_timesteps, num_steps)
  prev_steps = np.concatenate([steps[1:], [-1]]).astype(np.int32)
  ab_all = schedule.alphas_cumprod
  batch, ndim = x_T.shape[0], x_T.ndim

  def body(x, inputs):
    t_now, t_prev, key = inputs
    t = jnp.full((batch,), t_now, jnp.int32)
    prediction = guided_prediction(model_fn, x, t, context, uncond_context, guidance_scale)
    x0, eps = x0_eps_from_prediction(schedule, x, t, prediction.astype(x.dtype),
                                     prediction_type)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = x0_eps_from_prediction(schedule, x, t, x0, "x0")[1]
    shape = (1,) * ndim
    ab = ab_all[t_now].reshape(shape)
    ab_prev = jnp.where(t_prev >= 0, ab_all[jnp.maximum(t_prev, 0)], 1.0).reshape(shape)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return _step(x, x0, eps, ab, ab_prev, noise, method, eta).astype(x.dtype), None

  keys = jax.random.split(rng, num_steps)
  x, _ = jax.lax.scan(body, x_T, (jnp.asarray(steps), jnp.asarray(prev_steps), keys))
  return x


def make_sampler(model_apply: Callable, schedule: Schedule, sample_shape: tuple[int, ...], *,
                 num_steps: int = 50, method: str = "ddim", eta: float = 0.0,
                 prediction_type: str = "eps", clip_x0: float | None = None) -> Callable:
  """A jitted sampler over model variables.

  Args:
    model_apply: (variables, x_t, t, context) -> prediction, e.g. `unet.apply`.
    schedule: the training noise schedule.
    sample_shape: (h, w, c) of one sample.
    num_steps, method, eta, prediction_type, clip_x0: as in `sample`.

  Returns:
    jitted `fn(variables, rng, context, uncond_context, guidance_scale) -> [b, h, w, c]`
    with b = context.shape[0]. uncond_context may be None (no guidance). Variables,
    keys, contexts and the guidance scale are traced: new values do not recompile.
  """

  def fn(variables, rng, context, uncond_context, guidance_scale):
    start_key, loop_key = jax.random.split(rng)
    x_T = jax.random.normal(start_key, (context.shape[0], *sample_shape))
    model_fn = functools.partial(model_apply, variables)
    return sample(model_fn, schedule, x_T, loop_key, context, uncond_context, guidance_scale,
                  num_steps=num_steps, method=method, eta=eta,
                  prediction_type=prediction_type, clip_x0=clip_x0)

  return jax.jit(fn)
