"""diffusers / PEFT LoRA files (mmjax.interop.sd_lora): parity with `load_lora_weights`.

tests/fixtures/sd_tiny/sd1_lora/ is a LoRA file written by diffusers' save_lora_weights
for the tiny sd1_ddim pipeline (attention Linear, 1x1 and 3x3 Conv2d, text encoder
adapters); sd1_lora.npz holds diffusers' outputs with it loaded. Made by
tools/make_lora_fixtures.py; this test needs neither PyTorch nor diffusers.
"""
import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mmjax import lora
from mmjax.interop import sd_lora
from mmjax.pipelines import stable_diffusion

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
PIPELINE, LORA = FIXTURES / "sd1_ddim", FIXTURES / "sd1_lora"
UNET_TOL = json.loads((FIXTURES / "manifest.json").read_text())["tolerances"]["unet"]


@functools.cache
def _pipe():
  return stable_diffusion.StableDiffusion.from_pretrained(PIPELINE)


def _params():
  pipe = _pipe()
  return {"unet": pipe.unet_params, "text_encoder": pipe.text_params}


def _outputs(params):
  pipe, ref = _pipe(), np.load(FIXTURES / "sd1_ddim.npz")
  unet = jax.jit(pipe.unet.apply)({"params": params["unet"]}, ref["unet_x"].transpose(0, 2, 3, 1),
                                  ref["unet_t"], ref["unet_context"])
  text = jax.jit(pipe.text_encoder.apply, static_argnums=2)(
      {"params": params["text_encoder"]}, ref["text_ids"], 0)
  return np.asarray(unet).transpose(0, 3, 1, 2), np.asarray(text)


def test_loaded_lora_gives_diffusers_outputs():
  params, spec = sd_lora.load(LORA, _params())
  assert (spec.rank, spec.alpha) == (4, 8.0)
  unet_kernels = [p for p in lora.target_kernels(params, spec) if p.startswith("unet/")]
  assert any(p.endswith("resnets_0/conv1/kernel") for p in unet_kernels)  # 3x3 conv.
  assert any(p.endswith("proj_in/kernel") for p in unet_kernels)  # 1x1 conv.
  assert any(p.endswith("to_out_0/kernel") for p in unet_kernels)
  unet, text = _outputs(lora.merge(params, spec.scale))
  want = np.load(FIXTURES / "sd1_lora.npz")
  np.testing.assert_allclose(unet, want["unet_out"], atol=UNET_TOL, rtol=0)
  np.testing.assert_allclose(text, want["text_last"], atol=2e-5, rtol=0)
  base_unet, _ = _outputs(_params())  # The adapters matter: far from the base's output.
  assert np.abs(base_unet - want["unet_out"]).max() > 100 * UNET_TOL


def test_save_writes_the_file_diffusers_wrote(tmp_path):
  params, spec = sd_lora.load(LORA, _params())
  path = sd_lora.save(tmp_path, params, spec)
  theirs, mine = (st_numpy.load_file(p) for p in (LORA / sd_lora.WEIGHT_NAME, path))
  assert sorted(mine) == sorted(theirs)
  for key, value in theirs.items():
    assert mine[key].shape == value.shape and mine[key].dtype == np.float32
    np.testing.assert_array_equal(mine[key], value)
  again, spec2 = sd_lora.load(path, _params())
  assert (spec2.rank, spec2.alpha) == (spec.rank, spec.alpha)
  jax.tree.map(np.testing.assert_array_equal, lora.adapters(again), lora.adapters(params))


def test_a_file_for_another_model_or_format_is_refused(tmp_path):
  theirs = st_numpy.load_file(LORA / sd_lora.WEIGHT_NAME)
  key = next(k for k in theirs if k.endswith("to_q.lora_A.weight"))

  def write(state, name):
    st_numpy.save_file(state, tmp_path / name)
    return tmp_path / name

  wide = dict(theirs, **{key: np.zeros((4, theirs[key].shape[1] + 1), np.float32)})
  with pytest.raises(ValueError, match="do not fit the kernel"):
    sd_lora.load(write(wide, "wide.safetensors"), _params())
  kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": theirs[key]}
  with pytest.raises(ValueError, match="not a diffusers/PEFT LoRA key"):
    sd_lora.load(write(kohya, "kohya.safetensors"), _params())
  missing = {k.replace("to_q", "to_nothing"): v for k, v in theirs.items()}
  with pytest.raises(ValueError, match="no such kernel"):
    sd_lora.load(write(missing, "other.safetensors"), _params())
  with pytest.raises(FileNotFoundError, match="no LoRA file"):
    sd_lora.load(tmp_path, _params())


def test_generate_with_a_lora_equals_the_merged_pipeline():
  pipe = _pipe()
  adapted = pipe.with_lora(LORA)
  params, spec = sd_lora.load(LORA, _params())
  merged = lora.merge(params, spec.scale)
  jax.tree.map(np.testing.assert_array_equal, adapted.unet_params, merged["unet"])
  jax.tree.map(np.testing.assert_array_equal, adapted.text_params, merged["text_encoder"])
  jax.tree.map(np.testing.assert_array_equal, adapted.vae_params, pipe.vae_params)
