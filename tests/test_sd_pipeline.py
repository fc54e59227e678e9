"""Stable Diffusion in JAX: parity with diffusers' StableDiffusionPipeline on random tiny pipelines.

The fixtures (tests/fixtures/sd_tiny/: two pipeline folders written by diffusers'
save_pretrained, diffusers' outputs on fixed inputs, transformers' token ids) are made by
tools/make_sd_fixtures.py; this test needs neither PyTorch nor diffusers.
"""
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors import numpy as st_numpy

from mmjax.diffusion import hf_schedulers
from mmjax.interop import sd_pipeline
from mmjax.interop.common import CheckpointError
from mmjax.pipelines import stable_diffusion

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAMES = ("sd1_ddim", "sd2_euler")
UNET_TOL = MANIFEST["tolerances"]["unet"]
IMAGE_TOL = MANIFEST["tolerances"]["image"]


def _ref(name):
  return np.load(FIXTURES / f"{name}.npz")


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def pipes():
  return {name: stable_diffusion.StableDiffusion.from_pretrained(FIXTURES / name)
          for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_ids_equal_transformers(name):
  tokens = json.loads((FIXTURES / "tokens.json").read_text())
  tok = sd_pipeline.load_tokenizer(FIXTURES / name / "tokenizer")
  got, want = tok.encode(tokens["strings"]), np.array(tokens[name])
  assert got.shape == want.shape == (len(tokens["strings"]), 77)
  bad = [s for s, g, w in zip(tokens["strings"], got, want) if not np.array_equal(g, w)]
  assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]}"
  assert np.array_equal(tok.encode(MANIFEST["prompts"] + MANIFEST["negative_prompts"]),
                        _ref(name)["text_ids"])


def test_tokenizer_layouts_and_padding():
  """sd1's folder has tokenizer.json (pad <|endoftext|>), sd2's vocab.json + merges.txt
  (pad "!"); long prompts are cut to 77 with the end token last."""
  assert (FIXTURES / "sd1_ddim/tokenizer/tokenizer.json").is_file()
  assert (FIXTURES / "sd2_euler/tokenizer/merges.txt").is_file()
  a = sd_pipeline.load_tokenizer(FIXTURES / "sd1_ddim/tokenizer")
  b = sd_pipeline.load_tokenizer(FIXTURES / "sd2_euler/tokenizer")
  assert a.pad_id == a.eos_id and b.pad_id == 0 != b.eos_id
  long = a.encode("cat " * 200)[0]
  assert long[0] == a.bos_id and long[-1] == a.eos_id and a.pad_id not in long[1:-1]


@pytest.mark.parametrize("name", NAMES)
def test_unet_equals_diffusers(name, pipes):
  pipe, ref = pipes[name], _ref(name)
  out = jax.jit(pipe.unet.apply)({"params": pipe.unet_params}, _nhwc(ref["unet_x"]),
                                 ref["unet_t"], ref["unet_context"])
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _nhwc(ref["unet_out"]), atol=UNET_TOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_text_encoder_equals_transformers(name, pipes):
  pipe, ref = pipes[name], _ref(name)
  apply = jax.jit(pipe.text_encoder.apply, static_argnums=2)
  apply = functools.partial(apply, {"params": pipe.text_params}, ref["text_ids"])
  np.testing.assert_allclose(apply(0), ref["text_last"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(apply(1), ref["text_penultimate"], atol=1e-5, rtol=0)


def test_scheduler_timesteps_and_steps_equal_diffusers():
  ref = np.load(FIXTURES / "schedulers.npz")
  for case, (cls, config) in MANIFEST["schedulers"].items():
    s = hf_schedulers.from_config(dict(config, _class_name=cls))
    for n in MANIFEST["scheduler_steps"]:
      key = f"{case}/{n}"
      plan = s.plan(n)
      np.testing.assert_array_equal(plan.timesteps, ref[f"{key}/timesteps"].astype(np.float32))
      traj, outs = ref[f"{key}/trajectory"], ref[f"{key}/model_outputs"]
      x = traj[0]
      for i in range(n):
        scale = max(1.0, float(np.abs(x).max()))
        np.testing.assert_allclose(x * plan.input_scale[i], ref[f"{key}/inputs"][i],
                                   rtol=0, atol=1e-5 * scale, err_msg=key)
        x = np.asarray(s.step(plan.row(i), jnp.asarray(x), jnp.asarray(outs[i])))
        scale = max(1.0, float(np.abs(traj[i + 1]).max()))
        np.testing.assert_allclose(x, traj[i + 1], rtol=0, atol=1e-5 * scale, err_msg=key)


def test_pipeline_scheduler_timesteps(pipes):
  for name in NAMES:
    np.testing.assert_array_equal(pipes[name].scheduler.plan(MANIFEST["steps"]).timesteps,
                                  _ref(name)["timesteps"].astype(np.float32))


def _generate(pipe, ref, tag, **kwargs):
  options = {"cfg": dict(negative_prompts=MANIFEST["negative_prompts"],
                         guidance_scale=MANIFEST["guidance"]),
             "nocfg": dict(guidance_scale=1.0),
             "skip": dict(negative_prompts=MANIFEST["negative_prompts"], clip_skip=1,
                          guidance_scale=MANIFEST["clip_skip_guidance"])}[tag]
  return pipe.generate(MANIFEST["prompts"], num_steps=MANIFEST["steps"],
                       latents=_nhwc(ref["latents"]), return_latents=True, **options, **kwargs)


@pytest.mark.slow
def test_generation_equals_diffusers(pipes):
  """Euler, v-prediction, guidance with negative prompts; batch split over 8 devices."""
  pipe, ref = pipes["sd2_euler"], _ref("sd2_euler")
  steps = []
  images, latents = _generate(pipe, ref, "cfg", progress=lambda i, n: steps.append((i, n)))
  np.testing.assert_allclose(latents, _nhwc(ref["final_latents_cfg"]), atol=IMAGE_TOL, rtol=0)
  np.testing.assert_allclose(images, ref["image_cfg"], atol=IMAGE_TOL, rtol=0)
  assert sorted(steps) == [(i + 1, MANIFEST["steps"]) for i in range(MANIFEST["steps"])]


@pytest.mark.slow
@pytest.mark.parametrize("name,tag", [("sd1_ddim", "cfg"), ("sd1_ddim", "skip"),
                                      ("sd2_euler", "nocfg")])
def test_every_generation_equals_diffusers(name, tag, pipes):
  """The other scheduler, without guidance, and clip_skip (penultimate text layer)."""
  ref = _ref(name)
  images, latents = _generate(pipes[name], ref, tag)
  np.testing.assert_allclose(latents, _nhwc(ref[f"final_latents_{tag}"]), atol=IMAGE_TOL,
                             rtol=0)
  np.testing.assert_allclose(images, ref[f"image_{tag}"], atol=IMAGE_TOL, rtol=0)


def test_text_model_prefix_and_fp16_weights(tmp_path):
  """transformers 4's "text_model." keys load alike; sd2's files are float16."""
  src = FIXTURES / "sd1_ddim" / "text_encoder"
  shutil.copy(src / "config.json", tmp_path / "config.json")
  state = st_numpy.load_file(str(src / "model.safetensors"))
  st_numpy.save_file({f"text_model.{k}": v for k, v in state.items()},
                     str(tmp_path / "model.safetensors"))
  _, a, _ = sd_pipeline.load_text_encoder(src)
  _, b, _ = sd_pipeline.load_text_encoder(tmp_path)
  assert jnp.array_equal(a["final_layer_norm"]["scale"], b["final_layer_norm"]["scale"])
  unet_file = FIXTURES / "sd2_euler/unet/diffusion_pytorch_model.safetensors"
  assert next(iter(st_numpy.load_file(str(unet_file)).values())).dtype == np.float16


# --- wrong folders: one clear error each ---

def _copy(tmp_path, name="sd1_ddim"):
  dst = tmp_path / name
  shutil.copytree(FIXTURES / name, dst)
  return dst


def _edit_json(path, **changes):
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_vae_folder_given_as_pipeline():
  with pytest.raises(CheckpointError, match=r"AutoencoderKL folder.*not a pipeline.*"
                     r"model_index.json"):
    sd_pipeline.check_pipeline_folder(FIXTURES / "sd1_ddim" / "vae")


def test_missing_unet(tmp_path):
  folder = _copy(tmp_path)
  shutil.rmtree(folder / "unet")
  with pytest.raises(CheckpointError, match=r"no unet/"):
    stable_diffusion.StableDiffusion.from_pretrained(folder)


def test_unknown_scheduler_class(tmp_path):
  folder = _copy(tmp_path)
  _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="PNDMScheduler")
  with pytest.raises(hf_schedulers.SchedulerConfigError,
                     match=r"'PNDMScheduler' is not supported.*DDIMScheduler.*Euler"):
    sd_pipeline.load_scheduler(folder / "scheduler")
  s = sd_pipeline.load_scheduler(folder / "scheduler", override="euler")  # diffusers' from_config.
  assert s.name == hf_schedulers.EULER and s.config["steps_offset"] == 1


def test_unsupported_scheduler_option(tmp_path):
  folder = _copy(tmp_path)
  _edit_json(folder / "scheduler" / "scheduler_config.json", thresholding=True)
  with pytest.raises(hf_schedulers.SchedulerConfigError, match=r"thresholding=True"):
    sd_pipeline.load_scheduler(folder / "scheduler")


def test_unimplemented_unet_block(tmp_path):
  folder = _copy(tmp_path)
  config = json.loads((folder / "unet" / "config.json").read_text())
  types = list(config["down_block_types"])
  types[0] = "SimpleCrossAttnDownBlock2D"
  _edit_json(folder / "unet" / "config.json", down_block_types=types)
  with pytest.raises(CheckpointError, match=r"'SimpleCrossAttnDownBlock2D'.*does not "
                     r"implement.*CrossAttnDownBlock2D"):
    sd_pipeline.load_unet(folder / "unet")
  _edit_json(folder / "unet" / "config.json", down_block_types=config["down_block_types"],
             addition_embed_type="text_time")
  with pytest.raises(CheckpointError, match=r"addition_embed_type='text_time'"):
    sd_pipeline.load_unet(folder / "unet")


def test_config_that_does_not_describe_the_weights(tmp_path):
  folder = _copy(tmp_path)
  _edit_json(folder / "unet" / "config.json", cross_attention_dim=40)
  with pytest.raises(CheckpointError, match=r"attn2.to_k.weight.*expected shape"):
    sd_pipeline.load_unet(folder / "unet")


def test_other_pipeline_class_and_pickles(tmp_path):
  folder = _copy(tmp_path)
  _edit_json(folder / "model_index.json", _class_name="StableDiffusionXLPipeline")
  with pytest.raises(CheckpointError, match=r"StableDiffusionXLPipeline.*supported"):
    sd_pipeline.check_pipeline_folder(folder)
  os.rename(folder / "unet" / "diffusion_pytorch_model.safetensors",
            folder / "unet" / "diffusion_pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match=r"pickles.*safe_serialization"):
    sd_pipeline.load_unet(folder / "unet")


def test_generate_rejects_bad_inputs(pipes):
  pipe = pipes["sd1_ddim"]
  with pytest.raises(ValueError, match=r"negative prompt"):
    pipe.generate(["a", "b"], ["x", "y", "z"], num_steps=1)
  with pytest.raises(ValueError, match=r"latents of shape"):
    pipe.generate(["a"], num_steps=1, latents=np.zeros((1, 4, 8, 8), np.float32))
  with pytest.raises(ValueError, match=r"multiples of 4"):
    pipe.generate(["a"], num_steps=1, latents=np.zeros((1, 6, 6, 4), np.float32))


# --- the command ---

def _run_generate(*args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(FIXTURES.parents[2])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
  return subprocess.run([sys.executable, "-m", "mmjax.generate", *args], env=env,
                        capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_generate_command_equals_diffusers(tmp_path):
  """The CLI on the tiny SD 1.x-like pipeline (DDIM, epsilon): its PNG grid holds
  diffusers' images for the same latents, to the uint8 step."""
  ref = _ref("sd1_ddim")
  np.save(tmp_path / "latents.npy", _nhwc(ref["latents"]))
  out = tmp_path / "grid.png"
  run = _run_generate(f"--pretrained={FIXTURES / 'sd1_ddim'}",
                      f"--prompt={MANIFEST['prompts'][0]}",
                      f"--negative_prompt={MANIFEST['negative_prompts'][1]}",
                      f"--steps={MANIFEST['steps']}", f"--guidance={MANIFEST['guidance']}",
                      f"--latents={tmp_path / 'latents.npy'}", "--columns=2", f"--out={out}")
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"Wrote 2 images (16x16) to {out}" in run.stdout
  assert not re.search(r"^I\d{4} ", run.stderr, re.M), run.stderr  # No INFO log lines.
  assert [f"step {i}/{MANIFEST['steps']}" for i in range(1, MANIFEST["steps"] + 1)] == [
      line for line in run.stdout.splitlines() if line.startswith("step ")]
  grid = np.asarray(Image.open(out))
  assert grid.shape == (16, 32, 3) and grid.dtype == np.uint8
  want = stable_diffusion.to_uint8(ref["image_cli"])
  got = np.stack([grid[:, :16], grid[:, 16:]])
  assert np.abs(got.astype(int) - want).max() <= 1
  assert np.mean(got == want) > 0.99


def test_generate_command_refuses_a_vae_folder(tmp_path):
  run = _run_generate(f"--pretrained={FIXTURES / 'sd1_ddim' / 'vae'}", "--prompt=x",
                      f"--out={tmp_path / 'grid.png'}")
  assert run.returncode == 1 and not (tmp_path / "grid.png").exists()
  assert run.stderr.strip().splitlines()[-1].startswith("generate: ")
  assert "not a pipeline" in run.stderr
