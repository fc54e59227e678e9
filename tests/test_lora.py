"""LoRA adapters (mmjax/lora.py) on the CLIP task through tasks.adapted: exact at the
start, only adapters train, merge + open_clip export, FSDP and gradient accumulation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import configs
from mmjax import lora
from mmjax import tasks
from mmjax.data import tokenizer
from mmjax.interop import open_clip
from mmjax.models import clip as clip_model
from mmjax import parallel
from mmjax.train import trainer

ATTENTION = ".*/attention/(query|key|value|out)/kernel"


def _config(**lora_fields):
  c = configs.clip_fields(configs.base_config())
  c.task, c.loss = "clip", "softmax"
  c.global_batch_size = 16
  c.model = dict(image_variant="mu/7", image_dims=(32, 2, 64, 2), text_width=32, text_depth=1,
                 text_heads=2, text_mlp_dim=64, max_text_len=12, embed_dim=16)
  c.optimizer.name, c.optimizer.schedule, c.optimizer.learning_rate = "adamw", "constant", 1e-2
  c.optimizer.weight_decay = 0.01
  c.lora.update(dict(rank=4, alpha=8.0, targets=(ATTENTION,)), **lora_fields)
  return c


def _task(config, mesh):
  task = tasks.get_task(config, mesh)
  task.inner.model_image_shape = (28, 28, 1)  # What setup() reads from the dataset.
  return task


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 200, (n, 12)).astype(np.int32)
  tokens[np.arange(n), rng.integers(4, 12, n)] = tokenizer.EOS  # Pooled there.
  return {"image": rng.normal(size=(n, 28, 28, 1)).astype(np.float32),
          "tokens": tokens,
          "label": rng.integers(0, 10, n).astype(np.int32)}


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_at_the_start_the_adapted_model_is_the_base_model_bit_for_bit(scan):
  config = _config()
  config.scan_layers = scan
  mesh = parallel.make_mesh(jax.devices()[:1])
  task = _task(config, mesh)
  params, _ = jax.jit(task.init)(jax.random.PRNGKey(0))
  n_adapters, n_all = lora.count(params)
  assert 0 < n_adapters < 0.2 * n_all
  base = lora.strip(params)
  batch = _batch()
  adapted = jax.jit(task.embed)(params, {}, batch)
  plain = jax.jit(task.inner.embed)(base, {}, batch)
  for a, b in zip(adapted, plain):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_train_keeps_the_matching_base_leaves_trained_beside_the_adapters():
  """config.lora.train (PEFT's modules_to_save): the LayerNorms train in full beside the
  adapters, with Adam's moments; every other base leaf stays frozen, without them."""
  norms = r".*/ln[^/]*/(scale|bias)"
  config = _config(train=(norms, "logit_scale"))
  mesh = parallel.make_mesh(jax.devices()[:1])
  state, opt = trainer.create_train_state(config, _task(config, mesh), mesh)
  flat = lora._flat(state.params)
  frozen = lora._flat(opt.frozen)
  trained = {"/".join(k) for k, f in frozen.items() if not f}
  assert trained == {"/".join(k) for k in flat if k[-1] in lora.ADAPTER_NAMES
                     or re.fullmatch(norms, "/".join(k)) or k == ("logit_scale",)}
  assert any("/ln" in t for t in trained) and "logit_scale" in trained
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) >= 1)
  n_trained = sum(np.size(flat[k]) for k, f in frozen.items() if not f)
  assert moments == 2 * n_trained - 2  # logit_scale's two moments are scalars.
  with pytest.raises(ValueError, match=r"^config.lora.train pattern 'nope/.\*' matches no "
                                       r"parameter; parameter paths look like"):
    trainer.create_train_state(_config(train=("nope/.*",)), _task(config, mesh), mesh)


@pytest.mark.slow
def test_only_the_adapters_train_and_only_they_have_optimizer_state():
  config = _config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  task = _task(config, mesh)
  state, opt = trainer.create_train_state(config, task, mesh)
  before = jax.device_get(state.params)
  step = jax.jit(trainer._make_train_step(task, opt, 1, parallel.batch_sharded(mesh)))
  losses = []
  for i in range(3):
    state, metrics = step(state, _batch(seed=i))
    losses.append(float(metrics["train/loss"]))
  after = jax.device_get(state.params)
  flat_before, flat_after = lora._flat(before), lora._flat(after)
  for k, x in flat_before.items():
    if k[-1] in lora.ADAPTER_NAMES:
      assert not np.array_equal(x, flat_after[k]), k  # lora_a and lora_b both moved.
    else:
      np.testing.assert_array_equal(x, flat_after[k], err_msg="/".join(k))
  # Adam's moments exist for the adapters only: two per adapter leaf.
  n_adapters, _ = lora.count(before)
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) >= 1)
  assert moments == 2 * n_adapters
  assert np.all(np.isfinite(losses))


def test_merge_then_open_clip_export_gives_the_adapted_outputs(tmp_path):
  model = clip_model.CLIP(image_variant="clip/8", image_pool="tok", image_dims=(32, 2, 64, 2),
                          text_width=32, text_depth=1, text_heads=2, text_mlp_dim=64,
                          max_text_len=12, text_vocab_size=300, embed_dim=16,
                          openai_layout=True, activation="quick_gelu")
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 299, (3, 12)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), images, tokens)["params"]
  spec = lora.Spec(4, 8.0, (ATTENTION, ".*/mlp/fc1/kernel"))
  params = lora.add_adapters(params, spec, jax.random.PRNGKey(1))
  # As if trained: lora_b away from zero.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape) * 0.05
                    if str(p[-1].key) == lora.B else x), params)
  merged = lora.merge(params, spec.scale)
  assert not lora.has_adapters(merged)
  adapted = model.apply({"params": merged}, images, tokens)
  base = model.apply({"params": lora.strip(params)}, images, tokens)
  assert np.max(np.abs(adapted["image_emb"] - base["image_emb"])) > 1e-3  # Adapters count.
  path = tmp_path / "merged.safetensors"
  open_clip.export(merged, model, path)
  loaded_model, loaded = open_clip.load(path)
  out = loaded_model.apply({"params": loaded}, images, tokens)
  for k in ("image_emb", "text_emb"):
    np.testing.assert_allclose(out[k], adapted[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_fsdp_and_gradient_accumulation_give_the_one_device_losses():
  """A frozen base with adapters: 8 devices (data 4 x fsdp 2, the base's kernels split)
  with 2 micro-batches, and 1 device in one pass, from the same start."""
  runs = {}
  for n, fsdp, k in ((1, 1, 1), (8, 2, 2)):
    config = _config()
    config.mesh.fsdp, config.grad_accum_steps, config.fsdp_min_size = fsdp, k, 1024
    mesh = parallel.make_mesh(jax.devices()[:n], {"data": -1, "fsdp": fsdp})
    task = _task(config, mesh)
    state, opt = trainer.create_train_state(config, task, mesh)
    if fsdp > 1:  # The base's larger leaves are split along fsdp.
      assert any(x.sharding.spec != jax.sharding.PartitionSpec() and "fsdp" in str(x.sharding.spec)
                 for x in jax.tree.leaves(state.params))
    step = trainer.jit_train_step(task, opt, mesh, jax.tree.map(lambda x: x.sharding, state))
    losses = []
    for i in range(3):
      state, metrics = step(state, _batch(seed=i))
      losses.append([float(metrics["train/loss"]), float(metrics["train/grad_norm"])])
    runs[n] = np.array(losses)
  np.testing.assert_allclose(runs[8], runs[1], rtol=2e-5)


def test_bad_lora_settings_are_one_line_errors_before_compiling():
  mesh = parallel.make_mesh(jax.devices()[:1])
  cases = [
      (dict(targets=(".*/attention/qkv/kernel",)), r"matches no parameter; the model's kernels"),
      (dict(targets=(".*/ln1/scale",)), r"only leaves that are not kernels"),
      (dict(rank=33), r"rank=33 is larger than the smaller side of .*\[32, 32\]"),
      (dict(dropout=0.1), r"lora.dropout=0.1"),
  ]
  for fields, message in cases:
    config = _config()
    config.lora.update(fields)
    with pytest.raises(ValueError, match=message):
      _task(config, mesh).check()


def test_lora_on_a_model_without_matching_layers_is_a_clear_error():
  c = configs.base_config()
  c.task = "classify"
  c.model = "lenet5"
  c.lora.update(dict(rank=2, targets=(ATTENTION,)))
  mesh = parallel.make_mesh(jax.devices()[:1])
  task = tasks.get_task(c, mesh)
  task.inner.image_shape = (28, 28, 1)  # What setup() reads from the dataset.
  with pytest.raises(ValueError, match="matches no parameter; the model's kernels look like"):
    task.check()


def test_adapters_fit_the_unet_and_the_vlm_without_editing_them():
  """Shapes only (no compilation): convolutions, cross-attention and a VLM's two parts."""
  from mmjax.models import unet, vlm  # pylint: disable=import-outside-toplevel
  u = unet.UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                num_heads=2, groups=4, context_dim=12)
  u_params = jax.eval_shape(u.init, jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 2)),
                            jnp.zeros((2,)), jnp.zeros((2, 5, 12)))["params"]
  v = vlm.VisionLanguageModel(vision_variant="mu/7", num_latents=4, width=32, depth=2,
                              num_heads=2, mlp_dim=64, max_len=48)
  v_params = jax.eval_shape(v.init, jax.random.PRNGKey(0), jnp.zeros((1, 56, 56, 1)),
                            jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), bool))["params"]
  for params, targets in ((u_params, (".*/(query|key|value|out)/kernel", ".*/conv1/kernel")),
                          (v_params, (ATTENTION,))):
    spec = lora.Spec(2, 4.0, targets)
    adapted = jax.eval_shape(lambda p: lora.add_adapters(p, spec, jax.random.PRNGKey(0)), params)
    kernels = lora.target_kernels(params, spec)
    assert len(kernels) >= 4 and lora.count(adapted)[0] > 0
    for path in kernels:
      node = adapted
      for k in path.split("/")[:-1]:
        node = node[k]
      lead, n_in, n_out = lora.matrix_shape(path, node["kernel"].shape)
      assert node[lora.A].shape == (*lead, n_in, 2) and node[lora.B].shape == (*lead, 2, n_out)
    merged = jax.eval_shape(lambda p: lora.merge(p, spec.scale), adapted)
    assert jax.tree.map(lambda x: x.shape, merged) == jax.tree.map(lambda x: x.shape, params)
  conv = [p for p in lora.target_kernels(u_params, lora.Spec(2, 4.0, (".*/conv1/kernel",)))][0]
  assert lora.matrix_shape(conv, (3, 3, 16, 32)) == ((), 144, 32)  # kh·kw·in -> out.
  assert lora.matrix_shape("a/attention/query/kernel", (32, 2, 16)) == ((), 32, 32)
  assert lora.matrix_shape("a/attention/out/kernel", (2, 16, 32)) == ((), 32, 32)
  assert lora.matrix_shape("enc/blocks/attention/key/kernel", (4, 32, 2, 16)) == ((4,), 32, 32)


def test_an_embedding_table_is_adapted_as_a_vocab_by_width_matrix():
  """PEFT adapts nn.Embedding too: the table [vocab, width] is the matrix; a token's row
  moves by scale · A[token] @ B, so the adapted Embed equals a lookup in the merged table."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  embed = nn.Embed(11, 6, name="token_embedding")
  params = {"tok": embed.init(jax.random.PRNGKey(0), jnp.zeros((3,), jnp.int32))["params"]}
  spec = lora.Spec(2, 4.0, ("tok/embedding",))
  assert lora.target_kernels(params, spec) == ["tok/embedding"]
  adapted = lora.add_adapters(params, spec, jax.random.PRNGKey(1))
  assert adapted["tok"][lora.A].shape == (11, 2) and adapted["tok"][lora.B].shape == (2, 6)
  assert np.array_equal(lora.merge(adapted, spec.scale)["tok"]["embedding"],
                        params["tok"]["embedding"])
  adapted["tok"][lora.B] = jax.random.normal(jax.random.PRNGKey(2), (2, 6))
  tokens = jnp.array([0, 7, 7, 10])
  out = embed.apply({"params": lora.merge(adapted, spec.scale)["tok"]}, tokens)
  expected = params["tok"]["embedding"][tokens] + spec.scale * (
      adapted["tok"][lora.A][tokens] @ adapted["tok"][lora.B])
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="larger than the smaller side"):
    lora.target_kernels(params, lora.Spec(7, 7.0, ("tok/embedding",)))
