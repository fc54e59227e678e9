"""diffusers' DDIMScheduler and EulerDiscreteScheduler from their configs, as JAX steps.

A diffusers pipeline's `scheduler/scheduler_config.json` names the class and its
options. `from_config` reads it (missing keys take the class's defaults, as
`Scheduler.from_config` does) and `Scheduler.plan(num_steps)` gives, as NumPy arrays,
everything a denoising loop needs; `step` is then one pure function of the plan's
i-th row, the current latents and the model's output, so a whole loop of a fixed
number of steps compiles once (the plan's arrays are inputs, not constants):

  plan = scheduler.plan(50)
  x = latents * plan.init_noise_sigma
  for i in range(50):                          # or lax.fori_loop
    out = unet(x * plan.input_scale[i], plan.timesteps[i], context)
    x = scheduler.step(plan.row(i), x, out)

DDIM (eta = 0, deterministic): x' = sqrt(ab')·x0 + sqrt(1 − ab')·eps, where ab' is the
cumulative alpha at t − T // num_steps (diffusers' rule, whatever the spacing) or
`final_alpha_cumprod` below 0. Euler: x' = x + (x − x0)/σ·(σ' − σ) on the Karras
sigmas σ = sqrt((1 − ab)/ab) interpolated at the timesteps, the U-Net input divided by
sqrt(σ² + 1). Prediction types "epsilon", "v_prediction" and "sample"; spacings
"leading" (with `steps_offset`), "linspace" and "trailing"; betas "linear",
"scaled_linear", "squaredcos_cap_v2" or `trained_betas`. Options that change the
sampler in other ways (thresholding, Karras/exponential/beta sigmas, zero-terminal-SNR
rescaling, stochastic Euler) are refused by name, never ignored.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.diffusion import schedules

DDIM, EULER = "DDIMScheduler", "EulerDiscreteScheduler"
# Each class's constructor defaults in diffusers: what a config without the key means.
DEFAULTS = {
    DDIM: dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
               beta_schedule="linear", trained_betas=None, clip_sample=True,
               set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
               thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
               sample_max_value=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False),
    EULER: dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                interpolation_type="linear", use_karras_sigmas=False,
                use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero"),
}
SUPPORTED = tuple(DEFAULTS)
# Short names for `from_config(..., override=)`.
ALIASES = {"ddim": DDIM, "euler": EULER}
# Option -> the values supported (anything else is refused by name).
_ALLOWED = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "linspace", "trailing"),
    "thresholding": (False,), "rescale_betas_zero_snr": (False,),
    "interpolation_type": ("linear",), "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
    "timestep_type": ("discrete",), "final_sigmas_type": ("zero", "sigma_min"),
}


class SchedulerConfigError(ValueError):
  """A scheduler config mmjax does not implement."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """A fixed-length schedule: row i is step i. All arrays [num_steps] float32.

  timesteps: what the U-Net is given; input_scale: the U-Net input is latents times
  this; a, b: per-step coefficients of `Scheduler.step` (DDIM: cumulative alpha at t
  and at the previous timestep; Euler: σ and the next σ).
  """
  timesteps: np.ndarray
  input_scale: np.ndarray
  a: np.ndarray
  b: np.ndarray
  init_noise_sigma: float

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def arrays(self) -> dict:
    """The per-step arrays as a dict (a pytree to pass into a compiled loop)."""
    return {k: getattr(self, k) for k in ("timesteps", "input_scale", "a", "b")}

  def row(self, i) -> dict:
    return {k: v[i] for k, v in self.arrays().items()}


def _betas(config: dict) -> np.ndarray:
  """[T] float32 betas, computed as diffusers computes them (float32 linspace)."""
  n = config["num_train_timesteps"]
  if config["trained_betas"] is not None:
    return np.asarray(config["trained_betas"], np.float32)
  kind, start, end = config["beta_schedule"], config["beta_start"], config["beta_end"]
  if kind == "linear":
    return np.linspace(start, end, n, dtype=np.float32)
  if kind == "scaled_linear":
    return np.linspace(start**0.5, end**0.5, n, dtype=np.float32)**2
  return schedules.cosine_betas(n).astype(np.float32)


class Scheduler:
  """A DDIM or Euler discrete scheduler: `plan(num_steps)`, `step(row, x, out)`.

  `config` holds every option (the class's defaults filled in); `name` is the class.
  """

  def __init__(self, name: str, config: dict):
    self.name = name
    self.config = config
    self.alphas_cumprod = np.cumprod(1 - _betas(config), dtype=np.float32)
    self.prediction_type = config["prediction_type"]

  def __repr__(self):
    return (f"{self.name}(prediction_type={self.prediction_type!r}, "
            f"timestep_spacing={self.config['timestep_spacing']!r})")

  def timesteps(self, num_steps: int) -> np.ndarray:
    """diffusers' `set_timesteps(num_steps)` -> `scheduler.timesteps` (decreasing)."""
    c, n = self.config, num_steps
    t_train = c["num_train_timesteps"]
    if not 1 <= n <= t_train:
      raise ValueError(f"num_steps={n}: use 1 to num_train_timesteps={t_train}.")
    spacing = c["timestep_spacing"]
    if spacing == "linspace":
      out = np.linspace(0, t_train - 1, n)[::-1]
      return out.round() if self.name == DDIM else out.astype(np.float32)
    if spacing == "leading":
      return (np.arange(n) * (t_train // n)).round()[::-1] + c["steps_offset"]
    return np.round(np.arange(t_train, 0, -t_train / n)) - 1  # "trailing"

  def plan(self, num_steps: int) -> Plan:
    """The arrays of a `num_steps` loop (see Plan)."""
    t = self.timesteps(num_steps)
    ones = np.ones(num_steps, np.float32)
    ac = self.alphas_cumprod
    if self.name == DDIM:
      t = t.astype(np.int64)
      prev = t - self.config["num_train_timesteps"] // num_steps
      final = np.float32(1.0) if self.config["set_alpha_to_one"] else ac[0]
      ab_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
      return Plan(t.astype(np.float32), ones, ac[t], ab_prev, 1.0)
    sigmas_all = ((1 - ac) / ac)**0.5
    sigmas = np.interp(t, np.arange(len(sigmas_all)), sigmas_all)
    last = sigmas_all[0] if self.config["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    top = float(sigmas.max())
    init = top if self.config["timestep_spacing"] in ("linspace", "trailing") else (
        (top**2 + 1)**0.5)
    scale = (1 / (sigmas[:-1]**2 + 1)**0.5).astype(np.float32)
    return Plan(t.astype(np.float32), scale, sigmas[:-1], sigmas[1:], float(np.float32(init)))

  def step(self, row: dict, x: jax.Array, out: jax.Array) -> jax.Array:
    """One step from x (the latents at row["timesteps"]) given the U-Net's output."""
    a, b = row["a"], row["b"]
    kind = self.prediction_type
    if self.name == DDIM:
      sa, sb = jnp.sqrt(a), jnp.sqrt(1 - a)
      if kind == "epsilon":
        x0, eps = (x - sb * out) / sa, out
      elif kind == "sample":
        x0, eps = out, (x - sa * out) / sb
      else:
        x0, eps = sa * x - sb * out, sa * out + sb * x
      if self.config["clip_sample"]:
        r = self.config["clip_sample_range"]
        x0 = jnp.clip(x0, -r, r)
      return jnp.sqrt(b) * x0 + jnp.sqrt(1 - b) * eps
    sigma, sigma_next = a, b
    if kind == "epsilon":
      x0 = x - sigma * out
    elif kind == "sample":
      x0 = out
    else:
      x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    return x + (x - x0) / sigma * (sigma_next - sigma)


def from_config(config: dict, override: str | None = None, where: str = "scheduler") -> Scheduler:
  """A diffusers scheduler config (scheduler_config.json's dict) -> Scheduler.

  Args:
    config: the config; "_class_name" names the class.
    override: "ddim", "euler" (or a class name): that scheduler built from the config's
      options, as diffusers' `DDIMScheduler.from_config(other.config)` does; e.g. for a
      pipeline saved with PNDMScheduler.
    where: what to call the config in errors (its path).
  """
  name = config.get("_class_name")
  if override is not None:
    name = ALIASES.get(override, override)
    if name not in SUPPORTED:
      raise SchedulerConfigError(f"scheduler={override!r}: use one of {sorted(ALIASES)}.")
  elif name not in SUPPORTED:
    raise SchedulerConfigError(
        f"{where}: scheduler class {name!r} is not supported; mmjax implements {SUPPORTED}. "
        f"Pass scheduler='ddim' or 'euler' to use one of those with this config's betas "
        f"(as diffusers' Scheduler.from_config does).")
  full = dict(DEFAULTS[name])
  full.update({k: v for k, v in config.items() if k in full})
  for key, allowed in _ALLOWED.items():
    if key in full and full[key] not in allowed:
      raise SchedulerConfigError(f"{where}: {name} with {key}={full[key]!r} is not supported "
                                 f"(supported: {allowed}).")
  return Scheduler(name, full)
