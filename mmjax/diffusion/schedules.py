"""Noise schedules, forward noising, training targets and the diffusion loss.

Timesteps are integers t in [0, T): index t holds beta_{t+1} and
alpha_bar_{t+1} = prod_{s<=t} (1 - beta_s) of the papers' 1-based notation.
Images or latents x are [batch, height, width, channels]; t is [batch] int.
Prediction types: "eps" (the noise), "v" (Salimans & Ho 2022:
v = sqrt(ab)·eps − sqrt(1−ab)·x0) and "x0" (the clean sample).
"""
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("eps", "v", "x0")


@flax.struct.dataclass
class Schedule:
  """A discrete noise schedule; a pytree of two [T] float32 arrays.

  T (`num_timesteps`) is static: it is read from the arrays' shape.
  """
  betas: jax.Array  # [T]
  alphas_cumprod: jax.Array  # [T], alpha_bar_t = prod_{s<=t} (1 - beta_s).

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM (Ho et al. 2020): [T] betas evenly spaced from beta_start to beta_end."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Latent/Stable Diffusion: [T] betas = linspace(sqrt(start), sqrt(end))²."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2


def cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal 2021: [T] ab_t = f(t)/f(0), t = 1..T, f(t) = cos²((t/T+s)/(1+s)·π/2)."""
  f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2)**2
  return f(np.arange(1, num_timesteps + 1, dtype=np.float64)) / f(0.0)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008,
                 max_beta: float = 0.999) -> np.ndarray:
  """[T] betas = 1 − ab_t / ab_{t−1} of the cosine schedule, clipped at max_beta."""
  ab = np.concatenate([[1.0], cosine_alphas_cumprod(num_timesteps, s)])
  return np.minimum(1 - ab[1:] / ab[:-1], max_beta)


def schedule_from_betas(betas) -> Schedule:
  """[T] betas (computed in float64) -> Schedule of float32 arrays."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
    raise ValueError("betas must be a 1-D array with values in (0, 1).")
  return Schedule(betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(np.cumprod(1 - betas), jnp.float32))


def make_schedule(name: str = "linear", num_timesteps: int = 1000) -> Schedule:
  """A Schedule by name: "linear", "scaled_linear" or "cosine"."""
  makers = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}
  if name not in makers:
    raise ValueError(f"Unknown noise schedule {name!r}; use one of {sorted(makers)}.")
  return schedule_from_betas(makers[name](num_timesteps))


def _per_example(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values [T] gathered at t [batch] -> [batch, 1, ..., 1] with `ndim` dims in all."""
  return values[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def _coefficients(schedule: Schedule, t: jax.Array, ndim: int):
  """(sqrt(ab_t), sqrt(1 − ab_t)), each [batch, 1, ..., 1]."""
  ab = _per_example(schedule.alphas_cumprod, t, ndim)
  return jnp.sqrt(ab), jnp.sqrt(1 - ab)


def sample_timesteps(rng: jax.Array, batch_size: int, schedule: Schedule) -> jax.Array:
  """[batch] int32 timesteps drawn uniformly from [0, T)."""
  return jax.random.randint(rng, (batch_size,), 0, schedule.num_timesteps)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Forward noising x_t = sqrt(ab_t)·x0 + sqrt(1 − ab_t)·noise.

  Args:
    schedule: the noise schedule.
    x0: [batch, h, w, c] clean samples.
    t: [batch] int timesteps.
    noise: [batch, h, w, c] standard normal.

  Returns:
    [batch, h, w, c] noisy samples.
  """
  a, s = _coefficients(schedule, t, x0.ndim)
  return a * x0 + s * noise


def _check_type(prediction_type: str):
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type={prediction_type!r}: use one of {PREDICTION_TYPES}.")


def prediction_from_x0_eps(schedule: Schedule, t: jax.Array, x0: jax.Array, eps: jax.Array,
                           prediction_type: str = "eps") -> jax.Array:
  """What a model of `prediction_type` should output: the training target.

  Args:
    schedule: the noise schedule.
    t: [batch] int timesteps.
    x0, eps: [batch, h, w, c] clean sample and the noise added to it.
    prediction_type: "eps", "v" (sqrt(ab)·eps − sqrt(1−ab)·x0) or "x0".

  Returns:
    [batch, h, w, c].
  """
  _check_type(prediction_type)
  if prediction_type == "eps":
    return eps
  if prediction_type == "x0":
    return x0
  a, s = _coefficients(schedule, t, x0.ndim)
  return a * eps - s * x0


def training_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array,
                    prediction_type: str = "eps") -> jax.Array:
  """Alias of `prediction_from_x0_eps` in q_sample's argument order. [batch, h, w, c]."""
  return prediction_from_x0_eps(schedule, t, x0, noise, prediction_type)


def x0_eps_from_prediction(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                           prediction: jax.Array, prediction_type: str = "eps"):
  """Recovers (x0, eps) from x_t and a model's prediction of either type.

  Args:
    schedule: the noise schedule.
    x_t: [batch, h, w, c] noisy samples at t.
    t: [batch] int timesteps.
    prediction: [batch, h, w, c] model output of `prediction_type`.
    prediction_type: "eps", "v" or "x0".

  Returns:
    (x0, eps), each [batch, h, w, c], with x_t = sqrt(ab)·x0 + sqrt(1 − ab)·eps.
  """
  _check_type(prediction_type)
  a, s = _coefficients(schedule, t, x_t.ndim)
  if prediction_type == "eps":
    return (x_t - s * prediction) / a, prediction
  if prediction_type == "x0":
    return prediction, (x_t - a * prediction) / s
  return a * x_t - s * prediction, s * x_t + a * prediction  # v: a² + s² = 1.


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """[batch] signal-to-noise ratio ab_t / (1 − ab_t)."""
  ab = schedule.alphas_cumprod[t]
  return ab / (1 - ab)


def loss_weight(schedule: Schedule, t: jax.Array, prediction_type: str = "eps",
                weighting: str = "none", gamma: float = 5.0) -> jax.Array:
  """[batch] per-example loss weights.

  "none": 1. "min_snr" (Hang et al. 2023): the x0-space weight min(snr, gamma) expressed
  for the prediction type: min(snr, γ)/snr for eps, min(snr, γ)/(snr + 1) for v,
  min(snr, γ) for x0.
  """
  _check_type(prediction_type)
  if weighting == "none":
    return jnp.ones(t.shape, jnp.float32)
  if weighting != "min_snr":
    raise ValueError(f"weighting={weighting!r}: use 'none' or 'min_snr'.")
  r = snr(schedule, t)
  clipped = jnp.minimum(r, gamma)
  return {"eps": clipped / r, "v": clipped / (r + 1), "x0": clipped}[prediction_type]


def diffusion_loss(prediction: jax.Array, target: jax.Array, t: jax.Array, schedule: Schedule,
                   weighting: str = "none", *, prediction_type: str = "eps",
                   gamma: float = 5.0) -> jax.Array:
  """Weighted mean squared error per example.

  Args:
    prediction, target: [batch, h, w, c] model output and `training_target`.
    t: [batch] int timesteps.
    schedule: the noise schedule.
    weighting: "none" or "min_snr" (see `loss_weight`).
    prediction_type: what the model predicts ("eps", "v", "x0"); sets the min-SNR form.
    gamma: the min-SNR clip.

  Returns:
    [batch] losses: weight(t) · mean over h, w, c of (prediction − target)².
  """
  mse = jnp.mean(jnp.square(prediction - target), axis=tuple(range(1, prediction.ndim)))
  return loss_weight(schedule, t, prediction_type, weighting, gamma) * mse
