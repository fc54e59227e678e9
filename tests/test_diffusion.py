"""Noise schedules vs closed forms, forward noising, targets, DDPM/DDIM samplers, guidance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.diffusion import samplers
from mmjax.diffusion import schedules


def test_linear_and_scaled_linear_betas():
  lin = schedules.make_schedule("linear", 1000)
  np.testing.assert_allclose(lin.betas[np.array([0, -1])], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(np.diff(lin.betas), 0.0199 / 999, rtol=1e-3)
  sl = schedules.make_schedule("scaled_linear", 1000)
  np.testing.assert_allclose(sl.betas[np.array([0, -1])], [0.00085, 0.012], rtol=1e-6)
  np.testing.assert_allclose(np.sqrt(sl.betas), np.linspace(0.00085**0.5, 0.012**0.5, 1000),
                             rtol=1e-6)
  for s in (lin, sl):
    assert s.num_timesteps == 1000 and s.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - np.float64(s.betas)), rtol=1e-5)
    assert np.all(np.diff(s.betas) > 0) and np.all(np.diff(s.alphas_cumprod) < 0)


def test_cosine_alphas_cumprod_is_the_cos_squared_formula():
  sch = schedules.make_schedule("cosine", 1000)
  t = np.arange(1, 1001)
  f = lambda u: np.cos((u / 1000 + 0.008) / 1.008 * np.pi / 2)**2
  closed = f(t) / f(0)
  # Only the last beta hits the 0.999 clip; before it the product is the closed form.
  np.testing.assert_allclose(sch.alphas_cumprod[:-1], closed[:-1], rtol=1e-5, atol=1e-9)
  assert sch.betas[-1] == pytest.approx(0.999) and np.all(sch.betas[:-1] < 0.999)
  assert np.all(np.diff(sch.alphas_cumprod) < 0) and np.all(np.diff(sch.betas) > 0)
  with pytest.raises(ValueError, match="Unknown noise schedule"):
    schedules.make_schedule("quadratic")


def test_q_sample_mean_and_variance():
  sch = schedules.make_schedule("linear", 1000)
  n, x0 = 200_000, 0.7
  t = jnp.full((n,), 300)
  noise = jax.random.normal(jax.random.key(0), (n, 1, 1, 1))
  xt = np.asarray(schedules.q_sample(sch, jnp.full((n, 1, 1, 1), x0), t, noise))
  ab = float(sch.alphas_cumprod[300])
  assert xt.mean() == pytest.approx(np.sqrt(ab) * x0, abs=0.01)
  assert xt.var() == pytest.approx(1 - ab, rel=0.02)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_eps_v_x0_conversions_round_trip(name):
  sch = schedules.make_schedule(name, 1000)
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.normal(k1, (5, 4, 4, 3))
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 500, 900, 990])
  xt = schedules.q_sample(sch, x0, t, eps)
  ab = np.asarray(sch.alphas_cumprod[t])[:, None, None, None]
  v = schedules.training_target(sch, x0, t, eps, "v")
  np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, rtol=1e-5, atol=1e-6)
  for kind in schedules.PREDICTION_TYPES:
    pred = schedules.prediction_from_x0_eps(sch, t, x0, eps, kind)
    rx0, reps = schedules.x0_eps_from_prediction(sch, xt, t, pred, kind)
    # eps -> x0 divides by sqrt(ab) and x0 -> eps by sqrt(1 - ab): looser at the ends.
    np.testing.assert_allclose(rx0, x0, atol=2e-3)
    np.testing.assert_allclose(reps, eps, atol=2e-3)


def test_min_snr_weights_and_loss():
  sch = schedules.make_schedule("linear", 1000)
  t = jnp.array([0, 100, 999])
  snr = np.asarray(sch.alphas_cumprod[t] / (1 - sch.alphas_cumprod[t]))
  w = lambda kind: schedules.loss_weight(sch, t, kind, "min_snr", gamma=5.0)
  np.testing.assert_allclose(w("eps"), np.minimum(snr, 5) / snr, rtol=1e-5)
  np.testing.assert_allclose(w("v"), np.minimum(snr, 5) / (snr + 1), rtol=1e-5)
  np.testing.assert_allclose(schedules.loss_weight(sch, t, "v"), 1.0)
  pred, target = jnp.ones((3, 2, 2, 1)), jnp.zeros((3, 2, 2, 1))
  loss = schedules.diffusion_loss(pred, target, t, sch, "min_snr", prediction_type="v")
  assert loss.shape == (3,)
  np.testing.assert_allclose(loss, w("v"), rtol=1e-6)


def test_sampling_timesteps_trailing_subsequence():
  steps = samplers.sampling_timesteps(1000, 50)
  assert steps[0] == 999 and steps[-1] == 19 and len(steps) == 50
  assert np.all(np.diff(steps) == -20)
  np.testing.assert_array_equal(samplers.sampling_timesteps(10, 10), np.arange(9, -1, -1))
  for t, n in [(1000, 3), (1000, 30), (1000, 999), (7, 1)]:
    steps = samplers.sampling_timesteps(t, n)
    assert len(steps) == n and steps[0] == t - 1 and np.all(np.diff(steps) < 0) and steps[-1] >= 0


def _toy_model(x, t, context):
  """Prediction that depends on x, t and the context's mean."""
  return 0.1 * x + 0.01 * t[:, None, None, None] + context.mean(axis=(1, 2))[:, None, None, None]


def _contexts(b=3):
  cond = jax.random.normal(jax.random.key(2), (b, 5, 6))
  return cond, jnp.zeros((1, 5, 6))


def test_guidance_scale_one_is_the_conditional_prediction_in_one_doubled_call():
  calls = []

  def model(x, t, c):
    calls.append(x.shape[0])
    return _toy_model(x, t, c)

  x = jax.random.normal(jax.random.key(3), (3, 4, 4, 2))
  t = jnp.array([5, 50, 500])
  cond, uncond = _contexts()
  guided = jax.jit(lambda s: samplers.guided_prediction(model, x, t, cond, uncond, s))
  np.testing.assert_allclose(guided(1.0), _toy_model(x, t, cond), rtol=1e-6, atol=1e-6)
  unconditional = _toy_model(x, t, jnp.zeros_like(cond))
  np.testing.assert_allclose(guided(0.0), unconditional, atol=1e-6)
  assert calls == [6]  # One call (traced once for both scales), on the doubled batch.
  per_example = guided(jnp.array([1.0, 0.0, 1.0]))
  np.testing.assert_allclose(per_example[1], unconditional[1], atol=1e-6)


def test_sampler_with_guidance_one_equals_unguided():
  sch = schedules.make_schedule("linear", 100)
  x_T = jax.random.normal(jax.random.key(4), (3, 4, 4, 2))
  cond, uncond = _contexts()
  run = lambda u, s: samplers.sample(_toy_model, sch, x_T, jax.random.key(5), cond, u, s,
                                     num_steps=10, eta=0.5)
  guided = jax.jit(lambda s: run(uncond, s))
  unguided = run(None, 1.0)
  np.testing.assert_allclose(guided(1.0), unguided, rtol=1e-5, atol=1e-5)
  assert not np.allclose(guided(3.0), unguided, atol=1e-3)


def test_ddim_eta_zero_is_deterministic_and_eta_positive_is_not():
  sch = schedules.make_schedule("linear", 100)
  x_T = jax.random.normal(jax.random.key(6), (2, 4, 4, 1))
  cond, _ = _contexts(2)
  run = jax.jit(lambda rng, eta: samplers.sample(_toy_model, sch, x_T, rng, cond, num_steps=10,
                                                 eta=eta))
  k1, k2 = jax.random.key(7), jax.random.key(8)
  np.testing.assert_array_equal(run(k1, 0.0), run(k2, 0.0))
  assert not np.allclose(run(k1, 0.5), run(k2, 0.5), atol=1e-3)


def test_ddpm_equals_ddim_with_eta_one():
  sch = schedules.make_schedule("cosine", 100)
  x_T = jax.random.normal(jax.random.key(9), (2, 4, 4, 1))
  cond, _ = _contexts(2)
  run = lambda method, eta: samplers.sample(_toy_model, sch, x_T, jax.random.key(10), cond,
                                            num_steps=20, method=method, eta=eta)
  np.testing.assert_allclose(run("ddpm", 0.0), run("ddim", 1.0), rtol=1e-4, atol=1e-4)


def test_guidance_scale_change_does_not_recompile():
  traces = []

  def apply(variables, x, t, c):
    traces.append(1)  # Runs at trace time only.
    return variables["w"] * _toy_model(x, t, c)

  sch = schedules.make_schedule("linear", 100)
  sampler = samplers.make_sampler(apply, sch, (4, 4, 1), num_steps=5)
  cond, uncond = _contexts(2)
  outs = [sampler({"w": jnp.float32(w)}, jax.random.key(0), cond, uncond, scale)
          for w, scale in [(1.0, 1.0), (1.0, 3.0), (0.5, 7.5)]]
  assert sampler._cache_size() == 1 and len(traces) == 1
  assert not np.allclose(outs[0], outs[1])


def _oracle(sch, points, probs, prediction_type):
  """Exact E[eps | x_t] (or v) for data on the points [k] with probabilities [k], x [b,1,1,1]."""
  points, logp = jnp.asarray(points), jnp.log(jnp.asarray(probs))

  def model_fn(x, t, context):
    del context
    ab = sch.alphas_cumprod[t][:, None, None, None]
    a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    logits = logp - (x - a * points)**2 / (2 * s**2)  # [b, 1, 1, k]
    x0 = jnp.sum(jax.nn.softmax(logits, axis=-1) * points, axis=-1, keepdims=True)
    eps = (x - a * x0) / s
    return eps if prediction_type == "eps" else a * eps - s * x0

  return model_fn


@pytest.mark.parametrize("method,eta,prediction_type", [
    ("ddpm", 0.0, "eps"), ("ddim", 0.0, "eps"), ("ddim", 0.5, "v")])
def test_oracle_model_recovers_point_mass(method, eta, prediction_type):
  sch = schedules.make_schedule("linear", 1000)
  model_fn = _oracle(sch, [0.6], [1.0], prediction_type)
  x_T = jax.random.normal(jax.random.key(11), (64, 1, 1, 1))
  out = samplers.sample(model_fn, sch, x_T, jax.random.key(12), jnp.zeros((64, 1, 1)),
                        num_steps=25, method=method, eta=eta, prediction_type=prediction_type)
  np.testing.assert_allclose(out, 0.6, atol=1e-3)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_oracle_model_on_two_points_keeps_their_weights(method):
  sch = schedules.make_schedule("cosine", 1000)
  model_fn = _oracle(sch, [-1.0, 1.0], [0.25, 0.75], "v")
  n = 4000
  x_T = jax.random.normal(jax.random.key(13), (n, 1, 1, 1))
  out = np.asarray(samplers.sample(model_fn, sch, x_T, jax.random.key(14), jnp.zeros((n, 1, 1)),
                                   num_steps=50, method=method, prediction_type="v")).ravel()
  np.testing.assert_allclose(np.abs(out), 1.0, atol=1e-2)
  assert np.mean(out > 0) == pytest.approx(0.75, abs=0.03)
