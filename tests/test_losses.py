"""Contrastive losses vs NumPy, and over a 4-device mesh vs one device (negatives = global batch)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import losses
from mmjax import parallel


def _np_normalise(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_zero_safe_normalise(x):
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def np_info_nce(img, txt, t, normalise=_np_normalise):
  logits = normalise(img) @ normalise(txt).T / t
  n = len(img)
  return -0.5 * (np.mean(_np_log_softmax(logits)[np.arange(n), np.arange(n)])
                 + np.mean(_np_log_softmax(logits.T)[np.arange(n), np.arange(n)]))


def np_sigmoid(img, txt, log_scale, bias, normalise=_np_normalise):
  logits = normalise(img) @ normalise(txt).T * np.exp(log_scale) + bias
  labels = 2 * np.eye(len(img)) - 1
  return np.sum(np.log1p(np.exp(-labels * logits))) / len(img)


def _embeddings(n=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def test_info_nce_matches_numpy():
  img, txt = _embeddings()
  np.testing.assert_allclose(losses.info_nce(img, txt, 0.07), np_info_nce(img, txt, 0.07), rtol=1e-5)


def test_sigmoid_contrastive_matches_numpy():
  img, txt = _embeddings()
  np.testing.assert_allclose(losses.sigmoid_contrastive(img, txt, np.log(10.0), -10.0),
                             np_sigmoid(img, txt, np.log(10.0), -10.0), rtol=1e-5)


def test_perfect_alignment_gives_low_info_nce():
  img = np.eye(8, dtype=np.float32)
  assert float(losses.info_nce(img, img, 0.01)) < 1e-6
  assert float(losses.info_nce(img, img[::-1], 0.01)) > 10


@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
def test_four_devices_equal_one_device_loss_and_gradients(kind):
  """The global batch on 4 devices, each holding 4 rows, vs the plain function."""
  img, txt = _embeddings(16, 8)
  mesh = parallel.make_mesh(jax.devices()[:4])
  scalars = (jnp.float32(0.1),) if kind == "info_nce" else (jnp.float32(np.log(10.0)), jnp.float32(-5.0))
  plain = losses.info_nce if kind == "info_nce" else losses.sigmoid_contrastive
  sharded = losses.info_nce_sharded if kind == "info_nce" else losses.sigmoid_contrastive_sharded
  argnums = tuple(range(2 + len(scalars)))

  rows = NamedSharding(mesh, P("data"))
  args_sharded = (jax.device_put(img, rows), jax.device_put(txt, rows), *scalars)
  f4 = jax.jit(jax.value_and_grad(lambda *a: sharded(*a, mesh), argnums=argnums))
  f1 = jax.jit(jax.value_and_grad(plain, argnums=argnums))
  (l4, g4), (l1, g1) = f4(*args_sharded), f1(img, txt, *scalars)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  for a, b in zip(g4, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_each_device_computes_local_by_global_logits():
  """Inside the sharded loss, the logits are [local_batch, global_batch], not the square."""
  img, txt = _embeddings(16, 8)
  mesh = parallel.make_mesh(jax.devices()[:4])
  rows = NamedSharding(mesh, P("data"))
  jaxpr = jax.make_jaxpr(lambda a, b: losses.info_nce_sharded(a, b, 0.1, mesh))(
      jax.device_put(img, rows), jax.device_put(txt, rows))
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns[0].params["jaxpr"].eqns
            if eqn.primitive.name == "dot_general" for v in eqn.outvars}
  assert shapes == {(4, 16)}, shapes


def test_l2_normalise_is_unchanged_on_nonzero_rows():
  x, _ = _embeddings(64, 16)
  np.testing.assert_allclose(losses.l2_normalise(x), _np_normalise(x), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(losses.l2_normalise(np.zeros((2, 3), np.float32)), 0.0)


def test_the_issues_zero_row_example_has_finite_gradients():
  """Was a NaN row: the norm's gradient at 0 went through the forward-only clip."""
  grad = jax.grad(losses.info_nce)(jnp.eye(4).at[0].set(0.), jnp.eye(4), .1)
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[0], 0.0)  # A zero (padded, dead) row: no gradient.


@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
@pytest.mark.parametrize("devices", [1, 4])
def test_zero_rows_give_finite_gradients(kind, devices):
  """An all-zero image row and another text row: every gradient finite (zero for the zero
  rows), and the loss that of zero vectors in those rows."""
  img, txt = _embeddings(16, 8)
  img[3], txt[10] = 0.0, 0.0
  mesh = parallel.make_mesh(jax.devices()[:devices])
  if kind == "info_nce":
    scalars = (jnp.float32(0.1),)
    loss = functools.partial(losses.info_nce_sharded, mesh=mesh)
  else:
    scalars = (jnp.float32(np.log(10.0)), jnp.float32(-5.0))
    loss = functools.partial(losses.sigmoid_contrastive_sharded, mesh=mesh)
  rows = NamedSharding(mesh, P("data"))
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
      jax.device_put(img, rows), jax.device_put(txt, rows), *scalars)
  assert np.isfinite(value)
  for g in grads:
    assert np.isfinite(g).all()
  np.testing.assert_array_equal(grads[0][3], 0.0)
  np.testing.assert_array_equal(grads[1][10], 0.0)
  reference = np_info_nce if kind == "info_nce" else np_sigmoid
  np.testing.assert_allclose(value, reference(img, txt, *map(float, scalars),
                                              normalise=_np_zero_safe_normalise), rtol=1e-5)
