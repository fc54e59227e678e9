"""Bad shapes and static arguments raise a ValueError naming the function; NumPy integers
work wherever Python ints do; traced values are never checked (nothing at run time)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import losses
from mmjax import nn as mnn
from mmjax import parallel
from mmjax.data import sources

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
KERNEL = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4)), jnp.float32)
EMB = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stride=0), "conv2d: stride must be an integer >= 1, got 0"),  # Was ZeroDivisionError.
    (dict(stride=(1, 0)), "conv2d: stride"),
    (dict(stride=-2), "conv2d: stride"),
    (dict(stride=1.5), "conv2d: stride"),
    (dict(stride=True), "conv2d: stride"),
    (dict(stride=(1, 2, 3)), "conv2d: stride"),
    (dict(padding=-1), "conv2d: padding must be an integer >= 0"),
    (dict(padding=1.0), "conv2d: padding"),
    (dict(padding=((1, 0), (0, -1))), "conv2d: padding"),
    (dict(padding=(1, 2)), "conv2d: padding"),
    (dict(padding="FULL"), "conv2d: padding"),
    (dict(padding=1, padding_mode="reflect"), "conv2d: padding_mode"),
])
def test_conv2d_static_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mnn.conv2d(X, KERNEL, **kwargs)


@pytest.mark.parametrize("args, match", [
    ((X, KERNEL, jnp.zeros(1)), r"conv2d: bias must be \[out_channels\] = \(4,\), got shape \(1,\)"),
    ((X, KERNEL, jnp.zeros((1, 4))), "conv2d: bias"),
    ((X[0], KERNEL), r"conv2d: x must be \[batch, height, width, channels\]"),
    ((X, KERNEL[0]), "conv2d: kernel must be"),
    ((X, KERNEL[:, :, :2]), "conv2d: x has 3 channels but the kernel expects 2"),
    ((X, jnp.zeros((0, 3, 3, 4))), "conv2d: the kernel's window"),
    ((X, jnp.zeros((9, 9, 3, 4))), "conv2d: the kernel window .* is larger than"),
])
def test_conv2d_shapes(args, match):
  with pytest.raises(ValueError, match=match):
    mnn.conv2d(*args)


def test_numpy_integers_work_like_python_ints():
  """Were TypeError: 'numpy.int64' object is not iterable."""
  for stride, padding in [(2, 1), (1, ((1, 0), (2, 1)))]:
    expected = mnn.conv2d(X, KERNEL, stride=stride, padding=padding)
    np_stride = np.int64(stride)
    np_padding = np.int64(padding) if isinstance(padding, int) else np.array(padding)
    np.testing.assert_array_equal(mnn.conv2d(X, KERNEL, stride=np_stride, padding=np_padding),
                                  expected)
    np.testing.assert_array_equal(
        mnn.conv2d(X, KERNEL, stride=(np.int32(stride), np.int16(stride)), padding=padding),
        expected)
  for pool in (mnn.max_pool, mnn.avg_pool):
    np.testing.assert_array_equal(pool(X, np.int64(3), np.int64(2), np.int64(1)),
                                  pool(X, 3, 2, 1))
  model = mnn.Conv2D(4, np.int64(3), stride=np.int64(2), padding=np.int64(1))
  params = model.init(jax.random.key(0), X)
  assert model.apply(params, X).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("pool", ["max_pool", "avg_pool"])
@pytest.mark.parametrize("args, match", [
    ((0,), "window must be an integer >= 1, got 0"),
    ((2, 0), "stride must be an integer >= 1, got 0"),
    ((2, (2, 0)), "stride"),
    ((2.0,), "window"),
    ((2, 2, -1), "padding must be an integer >= 0"),
    ((2, 2, "FULL"), "padding"),
    ((9,), r"window \(9, 9\) is larger than the padded input"),
])
def test_pool_arguments(pool, args, match):
  with pytest.raises(ValueError, match=f"{pool}: {match}"):
    getattr(mnn, pool)(X, *args)


@pytest.mark.parametrize("pool", ["max_pool", "avg_pool"])
def test_pool_shape(pool):
  with pytest.raises(ValueError, match=rf"{pool}: x must be \[batch, height, width, channels\]"):
    getattr(mnn, pool)(X[0], 2)


def test_conv2d_module_kernel_size():
  with pytest.raises(ValueError, match="Conv2D: kernel_size must be an integer >= 1"):
    mnn.Conv2D(4, 0).init(jax.random.key(0), X)


def test_checks_are_static_so_jit_traces_through_them():
  """Every check reads shapes and static arguments only: jitted, they cost nothing."""
  conv = jax.jit(mnn.conv2d, static_argnames=("stride", "padding"))
  assert conv(X, KERNEL, jnp.zeros(4), stride=np.int64(2), padding=np.int64(1)).shape == (2, 4, 4, 4)
  with pytest.raises(ValueError, match="conv2d: bias"):
    conv(X, KERNEL, jnp.zeros(1))
  # A traced temperature, log_scale or bias is not checked (it has no value yet).
  assert np.isfinite(jax.jit(losses.info_nce)(EMB, EMB, jnp.float32(0.1)))
  assert np.isfinite(jax.jit(losses.sigmoid_contrastive)(EMB, EMB, 1.0, -1.0))
  labels = jnp.arange(8) % 4
  assert jax.jit(losses.softmax_cross_entropy)(EMB, labels).shape == (8,)


@pytest.mark.parametrize("fn", ["info_nce", "sigmoid_contrastive"])
@pytest.mark.parametrize("image, text", [
    (EMB[:4], EMB[:6]),  # Batches 4 and 6: failed inside optax, not naming info_nce.
    (EMB, EMB[:, :3]),
    (EMB[0], EMB[0]),
    (EMB[:0], EMB[:0]),
])
def test_contrastive_shapes(fn, image, text):
  scalars = (0.1,) if fn == "info_nce" else (1.0, -1.0)
  with pytest.raises(ValueError, match=f"{fn}: image_emb and text_emb must both be"):
    getattr(losses, fn)(image, text, *scalars)


@pytest.mark.parametrize("temperature", [0, 0.0, -0.1, np.float32(0.0), float("nan"),
                                         float("inf")])
def test_info_nce_static_temperature_must_be_positive(temperature):
  """temperature=0 gave NaN."""
  with pytest.raises(ValueError, match="info_nce: temperature must be > 0"):
    losses.info_nce(EMB, EMB, temperature)


def test_contrastive_scalars_must_be_scalars():
  with pytest.raises(ValueError, match=r"info_nce: temperature must be a scalar, got shape \(2,\)"):
    losses.info_nce(EMB, EMB, jnp.ones(2))
  with pytest.raises(ValueError, match="sigmoid_contrastive: log_scale must be a scalar"):
    losses.sigmoid_contrastive(EMB, EMB, jnp.ones(8), -1.0)
  with pytest.raises(ValueError, match="sigmoid_contrastive: bias must be a scalar"):
    losses.sigmoid_contrastive(EMB, EMB, 1.0, jnp.ones((8, 1)))


@pytest.mark.parametrize("fn", ["info_nce_sharded", "sigmoid_contrastive_sharded"])
def test_sharded_contrastive_checks(fn):
  mesh = parallel.make_mesh(jax.devices()[:4])
  scalars = (0.1,) if fn == "info_nce_sharded" else (1.0, -1.0)
  loss = getattr(losses, fn)
  with pytest.raises(ValueError, match=f"{fn}: image_emb and text_emb must both be"):
    loss(EMB[:4], EMB, *scalars, mesh)
  with pytest.raises(ValueError, match=f"{fn}: the batch of 6 does not split over 4 devices"):
    loss(EMB[:6], EMB[:6], *scalars, mesh)
  with pytest.raises(ValueError, match=f"{fn}: the mesh has no axis 'model'"):
    loss(EMB, EMB, *scalars, mesh, axis_name="model")
  if fn == "info_nce_sharded":
    with pytest.raises(ValueError, match=f"{fn}: temperature must be > 0"):
      loss(EMB, EMB, 0.0, mesh)
  rows = NamedSharding(mesh, P("data"))
  # Jitted: one compilation, not op by op.
  assert np.isfinite(jax.jit(lambda a, b: loss(a, b, *scalars, mesh))(
      jax.device_put(EMB, rows), jax.device_put(EMB, rows)))


@pytest.mark.parametrize("logits, labels, match", [
    (jnp.zeros((4, 10)), jnp.zeros(3, jnp.int32), r"labels must have the shape .* \(4,\)"),
    (jnp.zeros((4, 10)), jnp.zeros((4, 1), jnp.int32), "labels must have the shape"),
    (jnp.zeros((2, 5, 10)), jnp.zeros(2, jnp.int32), r"labels must have the shape .* \(2, 5\)"),
    (jnp.zeros((4, 10)), jnp.zeros(4, jnp.float32), "labels must be integer class ids"),
])
def test_softmax_cross_entropy_checks(logits, labels, match):
  with pytest.raises(ValueError, match=f"softmax_cross_entropy: {match}"):
    losses.softmax_cross_entropy(logits, labels)


def test_softmax_cross_entropy_out_of_range_labels_are_as_documented():
  """Traced label values are not checked: -1 reads the last class, 10 and -11 give NaN
  (the docstring says so; `sources.check_labels` catches them in NumPy batches)."""
  logits = jnp.tile(jnp.arange(10.0), (4, 1))
  ce = losses.softmax_cross_entropy(logits, jnp.array([-1, 9, 10, -11]))
  assert ce[0] == ce[1] and np.isnan(ce[2]) and np.isnan(ce[3])


def test_check_labels():
  sources.check_labels(np.array([0, 9, 3], np.uint8), 10, "mnist train")
  sources.check_labels(np.zeros((0,), np.int64), 10, "empty")
  sources.check_labels(np.arange(12).reshape(3, 4), 12, "grid")
  with pytest.raises(ValueError, match=r"^labels of batch 3: 2 of 4 labels are outside \[0, 10\): "
                                       r"-1, 12\. .*set the number of classes to 13 or more"
                                       r".*negative labels are not ignored"):
    sources.check_labels(np.array([1, -1, 12, 2]), 10, "labels of batch 3")
  with pytest.raises(ValueError, match=r"x: 1 of 2 labels .*: 10\..*number of classes to 11"):
    sources.check_labels([3, 10], 10, "x")
  with pytest.raises(ValueError, match=r"x: labels must be integer class ids, got dtype float32"):
    sources.check_labels(np.zeros(3, np.float32), 10, "x")
  with pytest.raises(ValueError, match="x: num_classes must be an integer >= 1"):
    sources.check_labels(np.zeros(3, np.int32), 0, "x")
