"""open_clip CLIP weights in and out: parity with open_clip on random reference models.

The fixtures (tests/fixtures/clip/: safetensors state dicts of two small random open_clip
CLIPs, one QuickGELU with patch 8 and one GELU with patch 16, and their embeddings on
fixed inputs) are made by tools/make_interop_fixtures.py; this test needs neither
PyTorch nor open_clip.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mmjax.interop import open_clip as oc
from mmjax.models import clip

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "clip"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = sorted(MANIFEST["models"])


def _load(name, path=None):
  spec = MANIFEST["models"][name]
  return oc.load(path or FIXTURES / f"{name}.safetensors", quick_gelu=spec["quick_gelu"],
                 **spec["heads"])


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


def test_fixtures_cover_two_architectures():
  models = MANIFEST["models"]
  assert len(models) >= 2
  assert {m["quick_gelu"] for m in models.values()} == {True, False}
  assert len({m["vision_cfg"]["patch_size"] for m in models.values()}) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_load_gives_open_clip_embeddings(name):
  ref = np.load(FIXTURES / f"{name}.npz")
  model, params = _load(name)
  spec = MANIFEST["models"][name]
  assert model.openai_layout and model.image_dims[0] == spec["vision_cfg"]["width"]
  assert model.activation == ("quick_gelu" if spec["quick_gelu"] else "gelu_exact")
  assert model.max_text_len == spec["text_cfg"]["context_length"]
  out = jax.jit(model.apply)({"params": params}, ref["images_nhwc"], ref["tokens"])
  np.testing.assert_allclose(out["image_emb"], ref["image_emb"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out["text_emb"], ref["text_emb"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(params["logit_scale"], ref["logit_scale"], rtol=0, atol=0)
  config = oc.read_config(FIXTURES / f"{name}.safetensors")
  assert config["vision_cfg"]["image_size"] == spec["vision_cfg"]["image_size"]


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_is_exact(name, tmp_path):
  model, params = _load(name)
  out = tmp_path / "exported.safetensors"
  oc.export(params, model, out)
  original, exported = st_numpy.load_file(FIXTURES / f"{name}.safetensors"), st_numpy.load_file(out)
  assert original.keys() == exported.keys()
  for key in original:
    assert original[key].shape == exported[key].shape and np.array_equal(original[key],
                                                                         exported[key]), key
  # The exported file records the activation and heads: no arguments needed.
  model_again, params_again = oc.load(out)
  assert model_again == model
  _assert_trees_equal(params_again, params)


def _random_params(model, *inputs, seed=3):
  """Parameters of `model`'s tree, shapes and dtypes (from jax.eval_shape of its init: no
  compilation), each leaf random normal: a round trip must keep any values."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), *inputs)["params"]
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def test_mmjax_checkpoint_round_trip_is_exact(tmp_path):
  model, _ = _load(NAMES[0])
  data = np.load(FIXTURES / f"{NAMES[0]}.npz")
  params = _random_params(model, data["images_nhwc"], data["tokens"])
  oc.export({"params": params}, model, tmp_path / "a.safetensors")
  model_again, params_again = oc.load(tmp_path / "a.safetensors")
  assert model_again == model
  _assert_trees_equal(params_again, params)


def test_export_refuses_mmjax_layout(tmp_path):
  model = clip.CLIP(max_text_len=8)
  params = _random_params(model, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="openai_layout=True"):
    oc.export(params, model, tmp_path / "x.safetensors")


@pytest.fixture
def state():
  return st_numpy.load_file(FIXTURES / f"{NAMES[0]}.safetensors")


def _load_error(tmp_path, tensors, **kw):
  path = tmp_path / "bad.safetensors"
  st_numpy.save_file(tensors, path)
  with pytest.raises(oc.CheckpointError) as e:
    oc.load(path, quick_gelu=True, **kw)
  return str(e.value)


def test_missing_key_is_named_with_its_shape(tmp_path, state):
  key = "visual.transformer.resblocks.1.attn.out_proj.bias"
  width = state[key].shape[0]
  del state[key]
  msg = _load_error(tmp_path, state)
  assert f"key {key!r}: expected shape ({width},), found missing" in msg


def test_wrong_shape_is_named_with_both_shapes(tmp_path, state):
  key = "transformer.resblocks.0.attn.in_proj_weight"
  expected = state[key].shape
  state[key] = state[key][:-3]
  msg = _load_error(tmp_path, state)
  assert f"key {key!r}: expected shape {expected}, found shape {state[key].shape}" in msg


def test_unexpected_key_is_named(tmp_path, state):
  state["visual.attn_pool.query"] = np.zeros((4, 8), np.float32)
  assert "unexpected key 'visual.attn_pool.query' (shape (4, 8))" in _load_error(tmp_path, state)


def test_unet_file_is_not_a_clip(tmp_path):
  unet = {"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32),
          "down_blocks.0.resnets.0.conv1.weight": np.zeros((32, 32, 3, 3), np.float32),
          "time_embedding.linear_1.weight": np.zeros((128, 32), np.float32)}
  msg = _load_error(tmp_path, unet)
  assert "key 'visual.conv1.weight': expected shape ('vision_width', 3, 'patch', 'patch'), " \
         "found missing" in msg and "conv_in.weight" in msg


def test_not_safetensors_and_missing_arguments(tmp_path):
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x00" * 64)
  with pytest.raises(oc.CheckpointError, match="not a readable safetensors file"):
    oc.load(junk, quick_gelu=True)
  with pytest.raises(ValueError, match="quick_gelu=True for OpenAI's weights"):
    oc.load(FIXTURES / f"{NAMES[0]}.safetensors")
  with pytest.raises(oc.CheckpointError, match="pass vision_heads="):
    oc.load(FIXTURES / f"{NAMES[0]}.safetensors", quick_gelu=True, vision_heads=5)


REAL = json.loads((FIXTURES / "open_clip_shapes.json").read_text())


# The smallest and the largest in the fast tier; the others alike in the slow one.
@pytest.mark.parametrize("name", [n if n in ("ViT-B-32", "ViT-bigG-14") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(REAL)])
def test_real_sizes_are_inferred_and_mapped(name):
  """open_clip's own B/32 ... bigG/14 keys and shapes (no weights): sizes, heads, tree."""
  shapes = {k: tuple(s) for k, s in REAL[name]["shapes"].items()}
  ref = REAL[name]["config"]
  config = oc.infer_config(shapes)
  oc.check_shapes(shapes, config)
  for tower in ("vision_cfg", "text_cfg"):
    for key, value in ref[tower].items():
      if key == "mlp_ratio":  # open_clip's MLP width is int(width * mlp_ratio).
        width = ref[tower]["width"]
        assert int(width * value) == int(width * config[tower][key]), tower
      elif key in config[tower]:
        assert config[tower][key] == value, (tower, key)
  assert config["embed_dim"] == ref["embed_dim"]
  vision_heads = oc._heads(config["vision_cfg"]["width"], None, "vision")
  text_heads = oc._heads(config["text_cfg"]["width"], None, "text")
  assert vision_heads == ref["vision_cfg"]["width"] // ref["vision_cfg"].get("head_width", 64)
  assert text_heads == ref["text_cfg"].get("heads", 8)
  model = clip.CLIP(**oc.clip_kwargs(config, False, vision_heads, text_heads))
  size, ctx = config["vision_cfg"]["image_size"], config["text_cfg"]["context_length"]
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1, ctx), jnp.int32))["params"]
  zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  mapped = oc.to_params(zeros, config, vision_heads, text_heads)
  assert jax.tree.structure(mapped) == jax.tree.structure(expected)
  assert [x.shape for x in jax.tree.leaves(mapped)] == [x.shape for x in jax.tree.leaves(expected)]


def test_siglip_style_logit_bias_loads_and_exports(tmp_path, state):
  state["logit_bias"] = np.array([-10.0], np.float32)  # open_clip's nonscalar form, [1].
  st_numpy.save_file(state, tmp_path / "b.safetensors")
  model, params = _load(NAMES[0], tmp_path / "b.safetensors")
  assert model.sigmoid and params["logit_bias"].shape == () and params["logit_bias"] == -10.0
  oc.export(params, model, tmp_path / "c.safetensors")
  assert st_numpy.load_file(tmp_path / "c.safetensors")["logit_bias"] == -10.0
