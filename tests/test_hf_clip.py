"""Hugging Face CLIPModel and SiglipModel folders in and out: parity with transformers.

The fixtures (tests/fixtures/hf_clip/: two random CLIPModels and two random SiglipModels as
save_pretrained writes them, their embeddings and logits on fixed inputs, a small
CLIPTokenizer and its ids) are made by tools/make_hf_fixtures.py; this test needs neither
PyTorch nor transformers.
"""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mmjax.interop.common import CheckpointError
from mmjax.interop import hf_clip
from mmjax.interop import hf_tokenizer
from mmjax.interop import load_pretrained
from mmjax.interop import pretrained

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_clip"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = sorted(MANIFEST["models"])
CLIP_FOLDER = FIXTURES / "clip_quickgelu_p8"  # Holds the tokenizer.


def test_fixtures_cover_two_shapes_of_each_family():
  for kind in ("clip", "siglip"):
    configs = [m["config"] for m in MANIFEST["models"].values() if m["kind"] == kind]
    assert len(configs) >= 2
    assert len({c["vision_config"]["patch_size"] for c in configs}) == len(configs)
    assert len({c["vision_config"]["num_hidden_layers"] for c in configs}) >= 2
  clip_acts = {m["config"]["vision_config"].get("hidden_act", "quick_gelu")
               for m in MANIFEST["models"].values() if m["kind"] == "clip"}
  assert clip_acts == {"quick_gelu", "gelu"}


@pytest.mark.parametrize("name", NAMES)
def test_load_gives_transformers_embeddings_and_logits(name):
  ref = np.load(FIXTURES / f"{name}.npz")
  pre = load_pretrained(FIXTURES / name)
  kind = MANIFEST["models"][name]["kind"]
  assert pre.kind == f"hf_{kind}"
  assert ("SiglipModel" if kind == "siglip" else "CLIPModel") in pre.describe()
  out = jax.jit(pre.model.apply)({"params": pre.params}, ref["images_nhwc"], ref["tokens"])
  np.testing.assert_allclose(out["image_emb"], ref["image_emb"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out["text_emb"], ref["text_emb"], rtol=0, atol=1e-5)
  logits = out["image_emb"] @ out["text_emb"].T * out["logit_scale"]
  if kind == "siglip":
    logits = logits + out["logit_bias"]
    np.testing.assert_array_equal(pre.params["logit_bias"], ref["logit_bias"].reshape(()))
  np.testing.assert_allclose(logits, ref["logits_per_image"], rtol=0, atol=1e-4)
  assert pre.image_size == ref["images_nhwc"].shape[1]
  assert pre.mean == ((0.5,) * 3 if kind == "siglip" else (0.48145466, 0.4578275, 0.40821073))


def test_configs_set_pooling_and_activation():
  legacy = hf_clip.model_from_folder(FIXTURES / "clip_gelu_p16")  # eos_token_id 2.
  assert legacy.text_pool == "argmax" and legacy.activation == "gelu_exact"
  clip = hf_clip.model_from_folder(CLIP_FOLDER)
  assert clip.text_pool == "eos" and clip.text_eos_id == 813
  assert clip.activation == "quick_gelu" and clip.layernorm_epsilon == 1e-5
  siglip = hf_clip.model_from_folder(FIXTURES / "siglip_gelu_p4")
  assert siglip.activation == "gelu_exact" and siglip.layernorm_epsilon == 1e-5
  assert siglip.image_pool == "map" and siglip.embed_dim == 24
  assert hf_clip.model_from_folder(FIXTURES / "siglip_p8").activation == "gelu"  # tanh.


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_is_exact(name, tmp_path):
  pre = load_pretrained(FIXTURES / name)
  hf_clip.export(pre.params, pre.model, tmp_path)
  original = st_numpy.load_file(FIXTURES / name / "model.safetensors")
  exported = st_numpy.load_file(tmp_path / "model.safetensors")
  assert original.keys() == exported.keys()
  for key in original:
    np.testing.assert_array_equal(original[key], exported[key], err_msg=key)
  again = load_pretrained(tmp_path)
  assert again.model == pre.model and again.kind == pre.kind
  jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)


def test_tokenizer_gives_transformers_ids(tmp_path):
  ref = json.loads((FIXTURES / "tokenizer_ids.json").read_text())
  only_bpe = tmp_path / "bpe"
  only_bpe.mkdir()
  for f in ("vocab.json", "merges.txt"):
    shutil.copy(CLIP_FOLDER / f, only_bpe / f)
  for folder in (CLIP_FOLDER, only_bpe):
    for ctx, ids in ref["ids"].items():
      tok = hf_tokenizer.PretrainedTokenizer(folder, int(ctx))
      assert tok.encode(ref["prompts"]).tolist() == ids, (folder, ctx)
  pre = load_pretrained(CLIP_FOLDER, weights=False)
  assert pre.params is None and pre.has_tokenizer()
  assert pre.tokenizer().encode(["a"]).shape == (1, pre.model.max_text_len)


def test_siglip_without_tokenizer_json_says_what_to_do(tmp_path):
  shutil.copytree(FIXTURES / "siglip_p8", tmp_path / "s")
  (tmp_path / "s" / "spiece.model").write_bytes(b"")
  pre = load_pretrained(tmp_path / "s", weights=False)
  assert not pre.has_tokenizer()
  with pytest.raises(CheckpointError, match="SiglipTokenizer"):
    pre.tokenizer()


def test_detects_every_layout():
  assert pretrained.detect(FIXTURES.parent / "clip" / "gelu_p16.safetensors") == "open_clip"
  assert pretrained.detect(CLIP_FOLDER) == "hf_clip"
  assert pretrained.detect(FIXTURES / "siglip_p8") == "hf_siglip"


def _copy(tmp_path, name="clip_gelu_p16"):
  folder = tmp_path / name
  shutil.copytree(FIXTURES / name, folder)
  return folder


def test_wrong_folders_are_clear_errors(tmp_path):
  supported = "supported: an open_clip"
  (tmp_path / "pipe").mkdir()
  (tmp_path / "pipe" / "model_index.json").write_text("{}")
  with pytest.raises(CheckpointError, match="diffusers pipeline folder.*" + supported):
    load_pretrained(tmp_path / "pipe")
  vae = tmp_path / "vae"
  vae.mkdir()
  (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  with pytest.raises(CheckpointError, match="model_type=None.*AutoencoderKL.*" + supported):
    load_pretrained(vae)
  with pytest.raises(CheckpointError, match="without config.json"):
    load_pretrained(FIXTURES)
  with pytest.raises(FileNotFoundError, match="supported"):
    load_pretrained(tmp_path / "nothing")
  with pytest.raises(CheckpointError, match="without its config.json"):
    load_pretrained(CLIP_FOLDER / "model.safetensors")
  with pytest.raises(ValueError, match="leave \\['quick_gelu'\\] unset"):
    load_pretrained(CLIP_FOLDER, quick_gelu=True)


def test_config_and_weights_that_disagree_name_the_key(tmp_path):
  folder = _copy(tmp_path)
  config = json.loads((folder / "config.json").read_text())
  config["vision_config"]["num_hidden_layers"] = 4
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="vision_model.encoder.layers.3.* missing"):
    load_pretrained(folder)
  config["vision_config"]["num_hidden_layers"] = 3
  config["model_type"] = "siglip"
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="expected shape"):
    load_pretrained(folder)
  config["model_type"] = "clip"
  config["text_config"]["hidden_act"] = "relu"
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="hidden_act='relu'"):
    load_pretrained(folder)


def test_missing_weights_file_is_a_clear_error(tmp_path):
  folder = _copy(tmp_path)
  (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="no model.safetensors.*safe_serialization"):
    load_pretrained(folder)


def test_sharded_weights_load(tmp_path):
  folder = _copy(tmp_path)
  state = st_numpy.load_file(folder / "model.safetensors")
  keys = sorted(state)
  halves = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for file, part in halves.items():
    st_numpy.save_file({k: state[k] for k in part}, folder / file)
  (folder / "model.safetensors").unlink()
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, part in halves.items() for k in part}}))
  pre = load_pretrained(folder)
  jax.tree.map(np.testing.assert_array_equal, pre.params,
               load_pretrained(FIXTURES / "clip_gelu_p16").params)


def test_older_checkpoints_position_ids_buffers_are_skipped(tmp_path):
  folder = _copy(tmp_path)
  state = st_numpy.load_file(folder / "model.safetensors")
  state["text_model.embeddings.position_ids"] = np.arange(12, dtype=np.int64)[None]
  state["vision_model.embeddings.position_ids"] = np.arange(10, dtype=np.int64)[None]
  st_numpy.save_file(state, folder / "model.safetensors")
  jax.tree.map(np.testing.assert_array_equal, load_pretrained(folder).params,
               load_pretrained(FIXTURES / "clip_gelu_p16").params)


def test_export_refuses_a_model_of_neither_layout():
  from mmjax.models import clip  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="neither Hugging Face CLIPModel's layout"):
    hf_clip.export({}, clip.CLIP(), "/nonexistent")
