"""diffusers AutoencoderKL weights in and out: parity with diffusers on a random reference VAE.

The fixtures (tests/fixtures/vae/: a small random diffusers AutoencoderKL of the KL-f8
layout, its posterior and decodings on fixed inputs, and the keys and shapes of Stable
Diffusion's real VAE) are made by tools/make_interop_fixtures.py; this test needs
neither PyTorch nor diffusers.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mmjax.interop import diffusers
from mmjax.interop import open_clip
from mmjax.models import autoencoder

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "vae"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
WEIGHTS = FIXTURES / "kl_small.safetensors"
GROUPS = MANIFEST["model"]["norm_num_groups"]


def _outputs(model, params, data):
  variables = {"params": params}
  encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))
  decode = jax.jit(lambda v, z: model.apply(v, z, method=model.decode))
  mean, logvar = encode(variables, data["images_nhwc"])
  return {"mean": mean, "logvar": logvar, "reconstruction": decode(variables, mean),
          "decoded": decode(variables, data["latents_nhwc"])}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def loaded():
  return diffusers.load_vae(WEIGHTS, groups=GROUPS)


def test_load_gives_diffusers_outputs(loaded):
  model, params = loaded
  assert model.mid_attention and model.quant_convs and model.decoder_extra_block
  assert model.channel_mult == (1, 2, 2, 2) and model.num_res_blocks == 2
  data = np.load(FIXTURES / "kl_small.npz")
  out = _outputs(model, params, data)
  for key, value in out.items():
    np.testing.assert_allclose(value, data[key], rtol=0, atol=1e-4, err_msg=key)


def test_old_attention_names_and_1x1_convs_load_the_same(loaded, tmp_path):
  state = st_numpy.load_file(WEIGHTS)
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for key, value in state.items():
    for new, name in old.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{name}.")
        value = value[:, :, None, None] if value.ndim == 2 else value
    renamed[key] = value
  st_numpy.save_file(renamed, tmp_path / "old.safetensors")
  _, params = diffusers.load_vae(tmp_path / "old.safetensors", groups=GROUPS)
  _assert_trees_equal(params, loaded[1])


def test_export_round_trips_exactly(loaded, tmp_path):
  model, params = loaded
  diffusers.export_vae(params, model, tmp_path / "vae.safetensors")
  original, exported = st_numpy.load_file(WEIGHTS), st_numpy.load_file(tmp_path / "vae.safetensors")
  assert original.keys() == exported.keys()
  for key in original:
    assert np.array_equal(original[key], exported[key]), key
  model_again, params_again = diffusers.load_vae(tmp_path / "vae.safetensors")  # groups: metadata.
  assert model_again == model
  _assert_trees_equal(params_again, params)


def test_stable_diffusion_vae_shapes_map_to_kl_f8():
  real = json.loads((FIXTURES / "sd_kl_f8_shapes.json").read_text())
  shapes = {k: tuple(s) for k, s in real["shapes"].items()}
  config = diffusers.infer_config(shapes)
  diffusers.check_shapes(shapes, config)
  kwargs = diffusers.model_kwargs(config)
  assert kwargs == autoencoder.KL_F8
  model = autoencoder.AutoencoderKL(**kwargs)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
  zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  mapped = diffusers.to_params(zeros, config)
  assert jax.tree.structure(mapped) == jax.tree.structure(expected)
  assert [x.shape for x in jax.tree.leaves(mapped)] == [x.shape for x in jax.tree.leaves(expected)]


def _load_error(tmp_path, tensors):
  path = tmp_path / "bad.safetensors"
  st_numpy.save_file(tensors, path)
  with pytest.raises(diffusers.CheckpointError) as e:
    diffusers.load_vae(path, groups=GROUPS)
  return str(e.value)


def test_mismatches_are_named_with_their_shapes(tmp_path):
  state = st_numpy.load_file(WEIGHTS)
  key = "decoder.up_blocks.1.resnets.2.conv2.weight"
  expected = state[key].shape
  state[key] = state[key][:, :-1]
  assert (f"key {key!r}: expected shape {expected}, found shape {state[key].shape}"
          in _load_error(tmp_path, state))
  state = st_numpy.load_file(WEIGHTS)
  del state["encoder.mid_block.attentions.0.to_v.bias"]
  assert ("key 'encoder.mid_block.attentions.0.to_v.bias': expected shape (16,), found missing"
          in _load_error(tmp_path, state))


def test_a_clip_file_is_not_a_vae_and_a_vae_is_not_a_clip(tmp_path):
  clip_file = pathlib.Path(__file__).parent / "fixtures" / "clip" / "quickgelu_p8.safetensors"
  msg = _load_error(tmp_path, st_numpy.load_file(clip_file))
  assert "key 'encoder.conv_in.weight': expected shape ('channels', 'in_channels', 3, 3), " \
         "found missing" in msg
  with pytest.raises(open_clip.CheckpointError, match="'visual.conv1.weight'.*found missing"):
    open_clip.load(WEIGHTS, quick_gelu=False)
