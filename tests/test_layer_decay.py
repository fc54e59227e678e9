"""Layer-wise learning-rate decay (config.optimizer.layer_decay): each leaf's rate is
lr · decay ** exponent, exactly, composed with frozen leaves and LoRA adapters."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import configs
from mmjax import lora
from mmjax.models import clip as clip_model
from mmjax.train import optim

DECAY, LR = 0.75, 0.01


def _params(scan=False, image_depth=3):
  model = clip_model.CLIP(image_variant="mu/7", image_dims=(16, image_depth, 32, 2),
                          text_width=16, text_depth=2, text_heads=2, text_mlp_dim=32,
                          max_text_len=8, embed_dim=8, scan_layers=scan)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                        jnp.zeros((1, 8), jnp.int32))["params"]


def _expected_exponent(path: str) -> int:
  """BEiT's numbering per tower: embeddings depth + 1, block i depth - i, the rest 0."""
  depth = {"image_tower": 3, "text_tower": 2}
  tower = path.split("/")[0]
  if tower not in depth or path.startswith(tower + "/encoder/ln_final"):
    return 0
  if "/encoder/block" in path:
    return depth[tower] - int(path.split("/encoder/block")[1].split("/")[0])
  return depth[tower] + 1  # Patch / token embedding, positions, class token.


def test_exponents_follow_the_towers_layers():
  params = _params()
  exps = dict(zip(optim.parameter_paths(params), jax.tree.leaves(
      optim.layer_decay_exponents(params))))
  for path, e in exps.items():
    assert e == _expected_exponent(path), path
  assert exps["image_tower/embedding/kernel"] == 4
  assert exps["image_tower/encoder/block0/mlp/fc1/kernel"] == 3
  assert exps["image_tower/encoder/block2/mlp/fc1/kernel"] == 1
  assert exps["text_tower/token_embedding/embedding"] == 3
  assert exps["image_proj/kernel"] == exps["logit_scale"] == 0


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_each_leafs_learning_rate_is_exactly_the_formula_with_frozen_leaves_and_lora(name):
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _params())
  spec = lora.Spec(2, 2.0, (".*/attention/(query|value)/kernel",))
  params = lora.add_adapters(params, spec, jax.random.PRNGKey(0))
  c = configs.base_config().optimizer
  c.name, c.learning_rate, c.schedule, c.layer_decay, c.b1 = name, LR, "constant", DECAY, 0.0
  c.weight_decay = 0.0
  frozen = optim.frozen_mask(params, ("text_tower/encoder/block1/.*",))
  tx, _ = optim.make_optimizer(c, 10, lambda p: jax.tree.map(lambda x: x.ndim >= 2, p), frozen)
  state = tx.init(params)
  # With Adam the first update is -lr · g / (|g| + eps) per element: lr · sign(g) for g = ±1.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  paths = optim.parameter_paths(params)
  for path, u, f, e in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(frozen),
                           jax.tree.leaves(optim.layer_decay_exponents(params))):
    if f:
      assert np.all(np.asarray(u) == 0), path
      continue
    assert lora.is_adapter(path), path  # With adapters, the base is frozen.
    rate = np.float32(LR) * np.float32(DECAY ** e)
    if name == "sgd":
      np.testing.assert_array_equal(np.asarray(u), np.full(u.shape, -rate, np.float32), path)
    else:
      np.testing.assert_allclose(np.asarray(u), -rate, rtol=2e-5, err_msg=path)  # Bias correction.
  # No optimizer state for the base (frozen by LoRA) nor the frozen adapters (SGD keeps
  # a momentum trace even with momentum 0).
  n_moments = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) >= 1)
  trained = sum(np.size(x) for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen))
                if not f)
  assert trained == sum(np.size(x) for p, x in zip(paths, jax.tree.leaves(params))
                        if lora.is_adapter(p) and not p.startswith("text_tower/encoder/block1/"))
  assert n_moments == {"sgd": 1, "adam": 2, "adamw": 2}[name] * trained


def test_layer_decay_1_is_the_plain_optimizer():
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _params())
  c = configs.base_config().optimizer
  frozen = optim.frozen_mask(params, ())
  tx, _ = optim.make_optimizer(c, 10, None, frozen)
  plain = optax.adam(optim.make_schedule(c, 10), b1=c.b1, b2=c.b2)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))


def test_a_scanned_encoder_or_a_model_without_blocks_is_a_clear_error():
  c = configs.base_config().optimizer
  c.layer_decay = DECAY
  params = _params(scan=True)
  with pytest.raises(ValueError, match="set config.scan_layers=False"):
    optim.make_optimizer(c, 10, None, optim.frozen_mask(params, ()))
  params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}}
  with pytest.raises(ValueError, match="no Transformer blocks"):
    optim.make_optimizer(c, 10, None, optim.frozen_mask(params, ()))
