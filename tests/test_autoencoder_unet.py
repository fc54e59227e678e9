"""KL autoencoder shapes, clamp and losses; U-Net shapes, zero init and cross-attention wiring."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import autoencoder
from mmjax.models import unet

RNG = np.random.default_rng(0)
# Initialising with threefry keys compiles ~3x slower on CPU than with rbg keys.
init_key = functools.partial(jax.random.key, impl="rbg")


@functools.cache
def _ae_and_variables():
  ae = autoencoder.AutoencoderKL(channels=8, channel_mult=(1, 2, 2), latent_channels=4, groups=4)
  encode = jax.jit(functools.partial(ae.apply, method=ae.encode))
  return ae, jax.jit(ae.init)(init_key(0), jnp.zeros((1, 28, 28, 1))), encode


def test_autoencoder_shapes_and_posterior_sampling():
  ae, variables, _ = _ae_and_variables()
  images = jnp.asarray(RNG.uniform(-1, 1, (2, 28, 28, 1)), jnp.float32)

  @jax.jit
  def run(variables, images, rng):
    mean, logvar = ae.apply(variables, images, method=ae.encode)
    decoded = ae.apply(variables, mean, method=ae.decode)
    return (mean, logvar, decoded), ae.apply(variables, images), ae.apply(variables, images, rng)

  (mean, logvar, decoded), (recon, m, lv), (sampled, _, _) = run(variables, images,
                                                                 jax.random.key(1))
  assert mean.shape == logvar.shape == (2, 8, 8, 4)
  assert decoded.shape == recon.shape == sampled.shape == images.shape
  np.testing.assert_allclose(recon, decoded, atol=1e-5)
  np.testing.assert_allclose(m, mean, atol=1e-5)
  np.testing.assert_allclose(lv, logvar, atol=1e-5)
  assert not np.allclose(sampled, recon)
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(functools.partial(ae.apply, method=ae.encode), variables,
                   jnp.zeros((1, 27, 28, 1)))


@pytest.mark.parametrize("bias,expected", [(100.0, 20.0), (-100.0, -30.0)])
def test_autoencoder_logvar_is_clamped(bias, expected):
  _, variables, encode = _ae_and_variables()
  params = jax.tree.map(lambda x: x, variables["params"])  # A copy to edit.
  conv_out = params["encoder"]["conv_out"]
  conv_out["bias"] = conv_out["bias"].at[4:].set(bias)
  _, logvar = encode({"params": params}, jnp.zeros((1, 28, 28, 1)))
  np.testing.assert_array_equal(logvar, expected)


def test_kl_and_reconstruction_losses_match_numpy():
  mean = RNG.normal(size=(3, 2, 2, 4)).astype(np.float32)
  logvar = RNG.normal(size=(3, 2, 2, 4)).astype(np.float32)
  kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(autoencoder.kl_divergence(mean, logvar), kl, rtol=1e-5)
  np.testing.assert_allclose(autoencoder.kl_divergence(0 * mean, 0 * logvar), 0.0)
  x, y = RNG.normal(size=(2, 5, 5, 1)), RNG.normal(size=(2, 5, 5, 1))
  l1, l2 = np.abs(x - y).sum(axis=(1, 2, 3)), ((x - y)**2).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(autoencoder.reconstruction_loss(x, y, "l1"), l1, rtol=1e-5)
  np.testing.assert_allclose(autoencoder.reconstruction_loss(x, y, "l2"), l2, rtol=1e-5)
  total = autoencoder.autoencoder_loss(x, y, mean[:2], logvar[:2], kl_weight=0.1, kind="l2")
  np.testing.assert_allclose(total, l2 + 0.1 * kl[:2], rtol=1e-5)


def test_latent_scale_factor_from_data():
  latents = 3.0 * RNG.normal(size=(64, 8, 8, 4)) + 0.5
  scale = autoencoder.latent_scale_factor(latents)
  assert scale == pytest.approx(1 / 3, rel=0.02)
  streamed = autoencoder.estimate_latent_scale(lambda b: b, np.split(latents, 4))
  assert streamed == pytest.approx(scale, rel=1e-9)


def test_timestep_embedding():
  emb = unet.timestep_embedding(jnp.array([0, 1, 999]), 8)
  assert emb.shape == (3, 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_allclose(emb[1, [0, 4]], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)


# A tiny U-Net on 8x8x2 latents: levels at 8x8 and 4x4, attention at 4x4 and in the middle.
TINY = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
            num_heads=2, groups=4, context_dim=12)


@functools.cache
def _unet_and_variables():
  model = unet.UNet(**TINY)
  x, t, c = _unet_inputs()
  return model, jax.jit(model.init)(init_key(0), x, t, c), jax.jit(model.apply)


def _unet_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)  # 5 tokens of width 12.
  return x, jnp.array([3, 700]), context


def _name(path) -> str:
  """A pytree path as "down1_attn0/block0/cross_attention/out/kernel"."""
  return "/".join(str(k.key) for k in path)


def _perturb(params, select, scale=0.3):
  """Adds scale·noise to every leaf whose name satisfies `select`; scale 0 sets it to zero."""
  def f(path, leaf):
    if not select(_name(path)):
      return leaf
    noise = np.random.default_rng(len(_name(path))).normal(size=leaf.shape)
    return leaf + scale * noise.astype(np.float32) if scale else jnp.zeros_like(leaf)
  return jax.tree_util.tree_map_with_path(f, params)


def test_unet_output_shape_and_zero_init():
  _, variables, apply = _unet_and_variables()
  x, t, c = _unet_inputs()
  out = apply(variables, x, t, c)
  assert out.shape == x.shape
  np.testing.assert_array_equal(out, 0.0)
  # Every transformer's output projection and residual branch's last conv starts at zero.
  leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  kernels = {_name(p): v for p, v in leaves if _name(p).endswith("kernel")}
  zero_init = [n for n in kernels if n.endswith(("proj_out/kernel", "conv2/kernel"))]
  assert len(zero_init) == 4 + 8  # 4 spatial transformers; 8 residual blocks.
  assert all(not np.any(kernels[n]) for n in zero_init)
  assert "mid_attn/block0/cross_attention/key/kernel" in kernels


def test_unet_output_depends_on_context_through_cross_attention():
  _, variables, apply = _unet_and_variables()
  x, t, c = _unet_inputs()
  c2 = c + 1.0
  # Only the output conv perturbed: the transformers still add zero, so no context.
  params = _perturb(variables["params"], lambda n: n.startswith("conv_out"))
  out = apply({"params": params}, x, t, c)
  assert np.abs(out).max() > 1e-3
  np.testing.assert_allclose(apply({"params": params}, x, t, c2), out, atol=1e-6)
  # All zero-initialised weights perturbed: the text context changes the output.
  zero_init = lambda n: n.startswith("conv_out") or "proj_out" in n or "conv2" in n
  params = _perturb(variables["params"], zero_init)
  out = apply({"params": params}, x, t, c)
  assert np.abs(apply({"params": params}, x, t, c2) - out).max() > 1e-3
  assert np.abs(apply({"params": params}, x, jnp.array([4, 10]), c) - out).max() > 1e-3
  # ... and only through cross-attention: without its output, the context is ignored.
  no_cross = _perturb(params, lambda n: "cross_attention/out/" in n, scale=0)
  np.testing.assert_allclose(apply({"params": no_cross}, x, t, c2),
                             apply({"params": no_cross}, x, t, c), atol=1e-5)


def test_unet_checks_its_inputs():
  model, variables, _ = _unet_and_variables()
  x, t, c = _unet_inputs()
  with pytest.raises(ValueError, match="divisible by 2"):
    model.apply(variables, jnp.zeros((2, 7, 8, 2)), t, c)
  with pytest.raises(ValueError, match="context of shape"):
    model.apply(variables, x, t, jnp.zeros((2, 5, 7)))
  with pytest.raises(ValueError, match="t of shape"):
    model.apply(variables, x, t[:1], c)
