"""Mixed precision, rematerialisation, scanned layers and dropout, on tiny models.

bfloat16 forward passes are close to float32 with float32 parameters and outputs;
remat and scan change no gradient; the CLIP task trains with dropout; configs with an
unknown dtype or policy are refused.
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import configs
from mmjax import models
from mmjax.nn import fusion
from mmjax import parallel
from mmjax.tasks import classify
from mmjax.tasks import clip as clip_task
from mmjax.train import guards


KEY = jax.random.PRNGKey(0)
BF16 = jnp.bfloat16


def _images(shape):
  return jax.random.normal(jax.random.PRNGKey(1), (2, *shape))


def _tokens(length=8):
  return jax.random.randint(jax.random.PRNGKey(2), (2, length), 3, 250)


def _params(model, *inputs, method=None):
  """Random parameters of `model`'s shapes and dtypes, without compiling its init (slow
  for a model of many parameters): matrices ~ N(0, 1 / fan_in), vectors ~ 1 + N(0, 0.1)."""
  rng = np.random.default_rng(0)

  def fill(x):
    std = 1 / np.sqrt(np.prod(x.shape[:-1])) if x.ndim >= 2 else 0.1
    mean = 0.0 if x.ndim >= 2 else 1.0
    return jnp.asarray(mean + std * rng.standard_normal(x.shape), x.dtype)

  return jax.tree.map(fill, jax.eval_shape(model.init, KEY, *inputs, method=method)["params"])


# name -> (model, inputs). Tiny, so that each compiles in about a second. CLIP's towers
# are the ViT and the text Transformer; the VLM holds a ViT, a perceiver resampler and a
# modality projection, ImageBERT the single-stream embedding.
MODELS = {
    "lenet5": lambda: (models.LeNet5(), (_images((28, 28, 1)),)),
    "small_cnn": lambda: (models.SmallCNN(), (_images((28, 28, 1)),)),
    "clip": lambda depth=1: (
        models.CLIP("mu/14", text_width=32, text_depth=depth, text_heads=2, text_mlp_dim=64,
                    embed_dim=16, image_dims=(32, depth, 64, 2)),
        (_images((28, 28, 1)), _tokens())),
    "autoencoder": lambda: (models.AutoencoderKL(channels=8, channel_mult=(1,), groups=4),
                            (_images((4, 4, 1)),)),
    "unet": lambda: (models.UNet(channels=8, channel_mult=(1,), num_res_blocks=0,
                                 attention_resolutions=(), groups=4, num_heads=2),
                     (_images((4, 4, 4)), jnp.array([3, 700]), _images((5, 16)))),
    "imagebert": lambda: (models.ImageBERT(width=32, depth=1, num_heads=2, mlp_dim=64,
                                           max_len=32), (_images((28, 28, 1)), _tokens())),
    "vlm": lambda: (models.VisionLanguageModel("mu/14", num_latents=2, width=32, depth=1,
                                               num_heads=2, mlp_dim=64, max_len=16),
                    (_images((28, 28, 1)), _tokens(), _tokens() > 100)),
}


# The fast tier runs the cheapest models; the slow tier all of them.
SLOW_TO_COMPILE = ("autoencoder", "imagebert", "unet", "vlm")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_COMPILE
                                  else n for n in sorted(MODELS)])
def test_bfloat16_forward_is_close_to_float32_with_float32_params_and_outputs(name):
  model, inputs = MODELS[name]()
  params = _params(model, *inputs)
  bf16 = model.clone(dtype=BF16)
  shapes = jax.eval_shape(bf16.init, KEY, *inputs)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  both = jax.jit(lambda p, *a: (model.apply({"params": p}, *a), bf16.apply({"params": p}, *a)))
  want, got = both(params, *inputs)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert g.dtype == jnp.float32, (name, g.dtype)
    scale = float(jnp.max(jnp.abs(w))) + 1e-3
    np.testing.assert_allclose(g, w, atol=0.06 * scale, rtol=0)


@pytest.mark.parametrize("module, inputs, out_dtype", [
    (models.ViT("mu/7", dims=(32, 1, 64, 2), dtype=BF16), lambda: _images((28, 28, 1)),
     jnp.float32),
    (models.TextTransformer(32, 1, 2, 64, dtype=BF16), _tokens, jnp.float32),
    (fusion.PerceiverResampler(3, num_heads=2, dtype=BF16), lambda: _images((6, 8)), BF16),
    (fusion.ModalityProjection(8, dtype=BF16), lambda: _images((6, 8)), BF16),
], ids=["vit", "text", "resampler", "projection"])
def test_towers_return_float32_and_building_blocks_their_dtype(module, inputs, out_dtype):
  """Traced only (no compilation): the dtypes of parameters and outputs."""
  inputs = (inputs(),)
  params = jax.eval_shape(module.init, KEY, *inputs)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(module.apply, params, *inputs).dtype == out_dtype


def test_param_dtype_bfloat16_keeps_the_tree_and_clip_logit_scale_float32():
  model, inputs = MODELS["clip"]()
  want = jax.eval_shape(model.init, KEY, *inputs)["params"]
  got = jax.eval_shape(model.clone(param_dtype=BF16, dtype=BF16).init, KEY, *inputs)["params"]
  assert jax.tree.map(lambda x: x.shape, got) == jax.tree.map(lambda x: x.shape, want)
  assert got["logit_scale"].dtype == jnp.float32
  others = {x.dtype for p, x in jax.tree_util.tree_leaves_with_path(got)
            if "logit_scale" not in jax.tree_util.keystr(p)}
  assert others == {jnp.dtype(BF16)}


def _assert_trees_close(a, b, rtol=1e-4):
  """Within float32 rounding: rtol, or rtol/10 of the largest value in `b` (gradients
  that are zero in exact arithmetic, as the key projection's bias's, are rounding)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  atol = 0.1 * rtol * max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _loss(model, inputs):
  """params -> a scalar of every output but CLIP's logit scale (no gradient through its
  clamp at init)."""
  def loss(params):
    out = model.apply({"params": params}, *inputs)
    out = [v for k, v in out.items() if k != "logit_scale"] if isinstance(out, dict) else [out]
    return sum(jnp.sum(jnp.sin(3 * y)) for y in out)
  return loss


def _stacked(params, depth):
  """Each tower's unscanned encoder block0..block{depth-1} as the scanned "blocks" layout."""
  def stack(encoder):
    blocks = [encoder[f"block{i}"] for i in range(depth)]
    rest = {k: v for k, v in encoder.items() if not k.startswith("block")}
    return {**rest, "blocks": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}
  return {k: {**v, "encoder": stack(v["encoder"])} if k.endswith("_tower") else v
          for k, v in params.items()}


def _shapes(tree):
  return jax.tree.map(lambda x: x.shape, tree)


@pytest.mark.slow  # Compiles several models: among the fast tier's costliest.
def test_remat_and_scanned_towers_change_no_loss_and_no_gradient():
  model, inputs = MODELS["clip"](depth=2)  # A 2-block ViT and a 2-block text Transformer.
  params = _params(model, *inputs)
  rematted = model.clone(remat="dots_with_no_batch_dims_saveable")
  scanned = model.clone(scan_layers=True)
  stacked = _stacked(params, depth=2)
  assert _shapes(jax.eval_shape(rematted.init, KEY, *inputs)["params"]) == _shapes(params)
  assert _shapes(jax.eval_shape(scanned.init, KEY, *inputs)["params"]) == _shapes(stacked)
  grad = lambda m, p: jax.value_and_grad(_loss(m, inputs))(p)
  (loss, grads), (loss_r, grads_r), (loss_s, grads_s) = jax.jit(
      lambda p, s: (grad(model, p), grad(rematted, p), grad(scanned, s)))(params, stacked)
  np.testing.assert_allclose([loss_r, loss_s], [loss, loss], rtol=1e-5)
  _assert_trees_close(grads_r, grads)
  _assert_trees_close(grads_s, _stacked(grads, depth=2))


@pytest.mark.slow  # Compiles several models: among the fast tier's costliest.
def test_unet_remat_changes_no_gradient_and_no_parameter():
  model, inputs = MODELS["unet"]()
  params = _params(model, *inputs)
  rematted = model.clone(remat="full")
  assert _shapes(jax.eval_shape(rematted.init, KEY, *inputs)["params"]) == _shapes(params)
  grad = lambda m: jax.value_and_grad(_loss(m, inputs))(params)
  (loss, grads), (loss_r, grads_r) = jax.jit(lambda: (grad(model), grad(rematted)))()
  np.testing.assert_allclose(loss_r, loss, rtol=1e-5)
  _assert_trees_close(grads_r, grads)


def _clip_task(dropout_rate=0.0, **fields):
  from experiments import clip_mnist  # pylint: disable=import-outside-toplevel
  config = clip_mnist.get_config("smoke")
  config.model.update(image_variant="mu/14", text_width=32, text_heads=2, text_mlp_dim=64,
                      embed_dim=16)
  config.model.image_dims = (32, 1, 64, 2)
  if dropout_rate:
    config.model.dropout_rate = dropout_rate  # Reaches CLIP through config.model.to_dict().
  config.update(fields)
  task = clip_task.ClipTask(config, parallel.make_mesh(jax.devices()[:1]))
  task.image_shape = task.model_image_shape = (28, 28, 1)
  return task


def _clip_batch(task):
  return {"image": _images((28, 28, 1)).repeat(4, 0),
          "tokens": task.tokenizer.encode(["a digit one", "two", "three", "four"] * 2)}


def _task_params(task, batch):
  inputs = (batch["image"], batch["tokens"]) if "tokens" in batch else (batch["image"],)
  return _params(task.model, *inputs)


def _loss_and_grads(task, batch, params):
  """The jitted (loss, gradients) of `task.loss` at `params`, as a function of its rng."""
  fn = jax.jit(jax.value_and_grad(lambda p, r: task.loss(p, {}, batch, r)[0]))
  return lambda rng: fn(params, rng)


def test_a_bfloat16_lenet5_train_step_through_the_task_loss_is_finite():
  from experiments import mnist_lenet  # pylint: disable=import-outside-toplevel
  config = mnist_lenet.get_config()
  config.dtype = "bfloat16"
  task = classify.ClassifyTask(config, parallel.make_mesh(jax.devices()[:1]))
  task.image_shape = (28, 28, 1)
  batch = {"image": _images((28, 28, 1)), "label": jnp.array([3, 7])}
  assert task.model.dtype == BF16
  loss, grads = _loss_and_grads(task, batch, _task_params(task, batch))(KEY)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_a_bfloat16_clip_train_step_with_dropout_is_finite_and_evaluation_deterministic():
  task = _clip_task(dropout_rate=0.3, dtype="bfloat16")
  assert task.model.dtype == BF16 and task.model.dropout_rate == 0.3
  batch = _clip_batch(task)
  loss_at = _loss_and_grads(task, batch, _task_params(task, batch))
  (loss1, grads), (loss2, _) = loss_at(jax.random.PRNGKey(1)), loss_at(jax.random.PRNGKey(2))
  assert loss1.dtype == jnp.float32 and np.isfinite(loss1) and np.isfinite(loss2)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert loss1 != loss2  # The loss draws a new dropout mask from each step's key.
  # Evaluation passes no "dropout" rng: dropout there would fail to trace.
  params = jax.eval_shape(lambda: _task_params(task, batch))
  image_emb, _ = jax.eval_shape(lambda p: task.embed(p, {}, batch), params)
  assert image_emb.dtype == jnp.float32


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float64", r"config.dtype='float64' \(use 'float32', 'bfloat16', 'float16'\)"),
    ("param_dtype", "bf16", r"config.param_dtype='bf16'"),
    ("remat", "some", r"config.remat='some' \(use 'none', 'full' or one of .*dots_saveable"),
    ("scan_layers", 1, r"config.scan_layers=1 \(True or False\)"),
])
def test_bad_precision_fields_are_refused(field, value, message):
  config = ml_collections.ConfigDict({**configs.base_config().to_dict(), field: value})
  with pytest.raises(guards.ConfigError, match=message):
    guards.validate(config, check_dataset=False)


def test_models_without_a_scanned_form_refuse_scan_layers():
  from experiments import mnist_lenet  # pylint: disable=import-outside-toplevel
  config = mnist_lenet.get_config()
  config.scan_layers = True
  with pytest.raises(ValueError, match=r"scan_layers=True: the classify task's model has no "
                                       r"scanned form"):
    classify.ClassifyTask(config, None)
  config.scan_layers, config.remat = False, "full"
  with pytest.raises(ValueError, match=r"remat='full': the classify task's model has no"):
    classify.ClassifyTask(config, None)


def test_a_run_saved_without_the_precision_fields_is_refused_naming_them(tmp_path):
  from experiments import clip_mnist  # pylint: disable=import-outside-toplevel
  config = clip_mnist.get_config()
  old = guards.as_json_dict(config)
  for field in ("dtype", "param_dtype", "remat", "scan_layers"):
    del old[field]
  del old["model"]["dropout_rate"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  # remat is safe to change, so its absence is not an error; nor are fields at
  # base_config's defaults (float32, no scan: what runs did before the fields existed).
  # model.dropout_rate has no such default; bfloat16 is not what an older run did.
  config.dtype = "bfloat16"
  with pytest.raises(guards.ConfigError, match=r"config.json has no field dtype, "
                                               r"model.dropout_rate: "
                                               r"it was written by an older mmjax"):
    guards.check_restart(config, str(tmp_path), step=5, write=False)
  config.dtype = "float32"
  old["model"]["dropout_rate"] = config.model.dropout_rate
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert guards.check_restart(config, str(tmp_path), step=5, write=False) == {}
