"""Flax NNX users: every public module family through `nnx.bridge.ToNNX` (docs/nnx.md).

Each test wraps a linen module, initialises it with `nnx.bridge.lazy_init`, runs it as an
NNX module, and checks the output against linen's `apply` on the same parameters, read
back with `nnx.state(model, nnx.Param).to_pure_dict()`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax import losses
from mmjax import models
from mmjax import nn as mnn


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _bridge(module, *args, **kwargs) -> nnx.bridge.ToNNX:
  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, *args, **kwargs)
  return model


def _params(model: nnx.Module) -> dict:
  """The NNX module's parameters as linen's `{"params": ...}` tree."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_same(got, want):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)


def _check(module, *args, method=None, **kwargs):
  """ToNNX(module) gives what module.apply gives, with the same parameters."""
  model = _bridge(module, *args, method=method, **kwargs)
  # Other methods of the linen module (CLIP's encode_text) are methods of the bridged one.
  got = model(*args, **kwargs) if method is None else getattr(model, method)(*args, **kwargs)
  want = module.apply({"params": _params(model)}, *args, method=method, **kwargs)
  _assert_same(got, want)
  assert jax.tree.leaves(_params(model)), "no parameters were created"
  return model


class ConvPoolNet(nnx.Module):
  """An NNX module of a user's: a bridged Conv2D, mmjax's pooling functions, nnx.Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.bridge.ToNNX(mnn.Conv2D(8, 3, stride=1, padding="SAME"), rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = mnn.max_pool(nnx.relu(self.conv(x)), 2)
    return self.head(mnn.avg_pool(x, 4).reshape(x.shape[0], -1))


SLOW = pytest.mark.slow
_X, _CTX, _IMAGE, _TEXT = (4, 8, 8, 3), (2, 7, 12), (2, 4, 16), (2, 3, 16)
_VALID = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
_IMAGE_VALID = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
_TEXT_VALID = jnp.array([[1, 1, 1], [1, 0, 0]], bool)
_MASK = mnn.padding_mask(_VALID, _VALID)
_SEQ = (2, 5, 16)
_CLIP = models.CLIP(image_variant="mu/4", text_width=32, text_depth=1, text_heads=2,
                    text_mlp_dim=64, max_text_len=8, embed_dim=16)
_TOKENS = jnp.array([[1, 5, 9, 3, 0, 0, 0, 0], [1, 7, 3, 0, 0, 0, 0, 0]], jnp.int32)

# (family, module, argument shapes or arrays, keyword arguments); one fast case per family.
# Conv2D and pooling: test_a_users_nnx_module_trains_through_the_bridge and
# test_linen_parameters_load_into_the_nnx_module.
CASES = [
    ("attention/transformer", mnn.EncoderBlock(num_heads=4, mlp_dim=32), [_SEQ, _MASK], {}),
    pytest.param("attention/transformer", mnn.MultiHeadAttention(num_heads=2, causal=True),
                 [_SEQ, _CTX], {}, marks=SLOW),
    pytest.param("attention/transformer", mnn.DecoderBlock(num_heads=4, mlp_dim=32),
                 [_SEQ, _CTX], {}, marks=SLOW),
    pytest.param("attention/transformer",
                 mnn.Encoder(depth=2, num_heads=4, mlp_dim=32, scan_layers=True), [_SEQ, _MASK],
                 {}, marks=SLOW),
    ("fusion", mnn.PerceiverResampler(num_latents=3, num_heads=2, width=16),
     [_IMAGE, _IMAGE_VALID], {}),
    pytest.param("fusion", mnn.SingleStreamEmbedding(max_len=9),
                 [_IMAGE, _IMAGE_VALID, _TEXT, _TEXT_VALID], {}, marks=SLOW),
    pytest.param("fusion", mnn.AdditiveEmbedding(max_len=4), [_IMAGE, jnp.zeros((2, 4), int)],
                 {}, marks=SLOW),
    pytest.param("fusion", mnn.ModalityProjection(out_width=24), [_IMAGE], {}, marks=SLOW),
    ("model", _CLIP, [_TOKENS], {"method": "encode_text"}),
    pytest.param("model", models.ViT(variant="mu/4", scan_layers=True, pool="gap"),
                 [(2, 16, 16, 3)], {}, marks=SLOW),
]


def _id(case) -> str:
  return case if isinstance(case, str) else type(case).__name__ if hasattr(case, "apply") else ""


@pytest.mark.parametrize("family, module, args, kwargs", CASES,
                         ids=lambda v: _id(v) or None)
def test_a_bridged_module_computes_what_linen_does(family, module, args, kwargs):
  del family  # In the test's id only.
  args = [_normal(i, a) if isinstance(a, tuple) else a for i, a in enumerate(args)]
  _check(module, *args, **kwargs)


@SLOW
def test_dropout_keys_come_from_the_dropout_stream():
  x = _normal(0, _SEQ)
  model = nnx.bridge.ToNNX(mnn.EncoderBlock(num_heads=4, mlp_dim=32, dropout_rate=0.5),
                           rngs=nnx.Rngs(params=0, dropout=1))
  nnx.bridge.lazy_init(model, x)
  a, b = model(x, deterministic=False), model(x, deterministic=False)
  assert not np.allclose(a, b)
  _assert_same(model(x), model(x))


def test_a_users_nnx_module_trains_through_the_bridge():
  x = _normal(0, _X)
  net = ConvPoolNet(nnx.Rngs(0))
  nnx.bridge.lazy_init(net, x)
  conv = _params(net.conv)
  pooled = mnn.max_pool(jax.nn.relu(
      mnn.Conv2D(8, 3, padding="SAME").apply({"params": conv}, x)), 2)
  _assert_same(net(x), net.head(mnn.avg_pool(pooled, 4).reshape(4, -1)))
  labels = jnp.arange(4) % 10
  optimizer = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(net, optimizer):
    loss_fn = lambda net: losses.softmax_cross_entropy(net(x), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(net)
    optimizer.update(net, grads)
    return loss

  first = step(net, optimizer)
  for _ in range(5):
    last = step(net, optimizer)
  assert last < first
  assert not np.allclose(_params(net.conv)["kernel"], conv["kernel"])


def test_linen_parameters_load_into_the_nnx_module():
  """A linen checkpoint's parameters, put into the bridged module: the same outputs."""
  x = _normal(0, (2, 8, 8, 3))
  conv = mnn.Conv2D(4, 3, padding="SAME")
  variables = conv.init(jax.random.PRNGKey(7), x)
  model = _bridge(conv, x)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, variables["params"])
  nnx.update(model, state)
  _assert_same(model(x), conv.apply(variables, x))
