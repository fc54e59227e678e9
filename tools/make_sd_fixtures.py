"""Regenerates tests/fixtures/sd_tiny/: two random tiny diffusers Stable Diffusion pipelines.

No weights can be downloaded, so parity with diffusers' StableDiffusionPipeline is
proven on small randomly initialised pipelines, saved with `save_pretrained` (the
folder layout users have on disk: model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/):

  * sd1_ddim: SD 1.x-like: U-Net with 1x1-convolution projections in its transformers
    (use_linear_projection=False), one head count for every level, QuickGELU text
    encoder, DDIM (scaled_linear betas, steps_offset=1, "leading" spacing), epsilon.
  * sd2_euler: SD 2.x-like: linear projections, per-level head counts, two transformer
    layers per block, GELU text encoder, pad token "!", Euler discrete with
    v_prediction and "trailing" spacing; weights stored as float16.

The tokenizer is CLIP's byte-level BPE cut to its first merges (a small real vocabulary).
Besides the folders, <name>.npz holds diffusers' outputs on fixed inputs (U-Net, text
encoder last and penultimate layer, scheduler trajectories, whole generations) and
tokens.json transformers' CLIPTokenizer ids for a few hundred strings. With
`--mmjax-python` the script then checks from the PyTorch side that mmjax, run in that
Python (no PyTorch there), gives the same numbers.

Run from the repository root in an environment with torch, diffusers and transformers:

  python tools/make_sd_fixtures.py --mmjax-python .venv/bin/python

The fixtures are deterministic for given package versions (fixed seeds, CPU).
"""
import argparse
import gzip
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "sd_tiny"
VOCAB = REPO / "tests" / "fixtures" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 1500  # The vocabulary: 512 byte symbols, these merges, 2 special tokens.
UNET_TOLERANCE = 1e-4
IMAGE_TOLERANCE = 2e-3
PROMPTS = ["a photo of a cat", "the quick brown fox jumps over the lazy dog, " * 8]
NEGATIVE = ["", "blurry, low quality"]
STEPS = 4
GUIDANCE = 7.5

VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
           layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
PIPELINES = {
    "sd1_ddim": dict(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
                  layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=24, attention_head_dim=4, norm_num_groups=4,
                  use_linear_projection=False),
        text=dict(hidden_size=24, intermediate_size=48, num_attention_heads=4,
                  num_hidden_layers=3, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        pad_token="<|endoftext|>", fp16=False, old_tokenizer_files=False,
        scheduler=("DDIMScheduler", dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")),
        scaling_factor=0.18215),
    "sd2_euler": dict(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                  layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
                  transformer_layers_per_block=2),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_hidden_layers=2, hidden_act="gelu", layer_norm_eps=1e-5),
        pad_token="!", fp16=True, old_tokenizer_files=True,
        scheduler=("EulerDiscreteScheduler", dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", steps_offset=1, prediction_type="v_prediction",
            timestep_spacing="trailing")),
        scaling_factor=0.5),
}
# Scheduler configurations whose timesteps and step arithmetic are checked (no U-Net).
SCHEDULER_CASES = {
    "ddim_leading": ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, clip_sample=False,
                                           set_alpha_to_one=False, steps_offset=1)),
    "ddim_trailing_v": ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                              beta_end=0.012, clip_sample=False,
                                              timestep_spacing="trailing",
                                              prediction_type="v_prediction")),
    "ddim_linspace_clip": ("DDIMScheduler", dict(beta_schedule="linear", clip_sample=True,
                                                 timestep_spacing="linspace")),
    "euler_linspace": ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear",
                                                      beta_start=0.00085, beta_end=0.012)),
    "euler_leading_offset": ("EulerDiscreteScheduler", dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        timestep_spacing="leading")),
    "euler_trailing_v": ("EulerDiscreteScheduler", dict(
        beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction")),
}
SCHEDULER_STEPS = (1, 3, 7, 50)


def tokenizer_strings() -> list[str]:
  """make_interop_fixtures' varied strings, plus CLIP's special tokens written in text."""
  sys.path.insert(0, str(REPO / "tools"))
  import make_interop_fixtures  # pylint: disable=import-outside-toplevel
  return make_interop_fixtures.tokenizer_strings() + [
      "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "!!!", "! ! !", PROMPTS[1]]


def write_vocab(folder: pathlib.Path) -> None:
  """vocab.json + merges.txt: CLIP's vocabulary with its first NUM_MERGES merges."""
  with gzip.open(VOCAB, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = lines[1:NUM_MERGES + 1]
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  symbols = [chr(c) for c in cs]
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)},
                                                ensure_ascii=False))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build(name: str, spec: dict, out: pathlib.Path, vae: dict = VAE) -> None:
  """Builds a random pipeline and saves it with save_pretrained into out/name."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    write_vocab(pathlib.Path(tmp))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp, pad_token=spec["pad_token"],
                                                           model_max_length=77)
  torch.manual_seed(sorted(PIPELINES).index(name) if name in PIPELINES else 0)
  unet = diffusers.UNet2DConditionModel(**spec["unet"])
  vae = diffusers.AutoencoderKL(**vae, scaling_factor=spec["scaling_factor"])
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), max_position_embeddings=77,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id, **spec["text"]))
  # Random weights of a larger spread than the initialisers', so that every part matters.
  with torch.no_grad():
    for model in (unet, vae, text):
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
  cls, config = spec["scheduler"]
  scheduler = getattr(diffusers, cls)(**config)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  if spec["fp16"]:
    pipe.to(torch.float16)
  if (out / name).exists():
    shutil.rmtree(out / name)
  pipe.save_pretrained(out / name, safe_serialization=True)
  if spec["old_tokenizer_files"]:
    write_old_tokenizer(out / name / "tokenizer", spec["pad_token"])


def write_old_tokenizer(folder: pathlib.Path, pad_token: str) -> None:
  """The tokenizer files older transformers wrote (and SD 1.x/2.x repositories hold):
  vocab.json + merges.txt, special tokens as AddedToken dicts, no tokenizer.json."""
  shutil.rmtree(folder)
  write_vocab(folder)
  added = lambda t: {"__type": "AddedToken", "content": t, "lstrip": False,
                     "normalized": True, "rstrip": False, "single_word": False}
  special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
             "unk_token": added("<|endoftext|>"), "pad_token": pad_token}
  (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      dict(special, add_prefix_space=False, do_lower_case=True, errors="replace",
           model_max_length=77, tokenizer_class="CLIPTokenizer"), indent=2))


def reference(name: str, spec: dict, out: pathlib.Path) -> dict:
  """diffusers' outputs on fixed inputs, from the pipeline loaded back from disk."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      out / name, torch_dtype=torch.float32, safety_checker=None)
  rng = np.random.default_rng(7)
  ucfg, tcfg = spec["unet"], spec["text"]
  res = {}
  # The U-Net on random inputs: an integer and a fractional timestep.
  x = rng.standard_normal((2, 4, 8, 16), dtype=np.float32)
  t = np.array([999.0, 333.25], np.float32)
  ctx = rng.standard_normal((2, 77, ucfg["cross_attention_dim"]), dtype=np.float32)
  with torch.no_grad():
    res["unet_out"] = pipe.unet(torch.from_numpy(x), torch.from_numpy(t),
                                encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
  res.update(unet_x=x, unet_t=t, unet_context=ctx)
  # The text encoder: last hidden state and the penultimate one through the final norm.
  ids = pipe.tokenizer(PROMPTS + NEGATIVE, padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt").input_ids
  encoder = pipe.text_encoder
  final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 5: no
  with torch.no_grad():                                                   # text_model.
    outputs = encoder(ids, output_hidden_states=True)
    res["text_last"] = outputs.last_hidden_state.numpy()
    res["text_penultimate"] = final_norm(outputs.hidden_states[-2]).numpy()
  res["text_ids"] = ids.numpy()
  # Whole generations from fixed initial latents (NCHW as diffusers takes them).
  latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
  res["latents"] = latents
  # clip_skip=1 (the penultimate layer): diffusers' own clip_skip reads
  # text_encoder.text_model, which transformers 5 no longer has, so the embeddings are
  # passed in, computed as diffusers computes them.
  skip = torch.from_numpy(res["text_penultimate"])
  for tag, kwargs in (("cfg", dict(prompt=PROMPTS, guidance_scale=GUIDANCE,
                                   negative_prompt=NEGATIVE)),
                      ("nocfg", dict(prompt=PROMPTS, guidance_scale=1.0)),
                      ("skip", dict(prompt_embeds=skip[:2], negative_prompt_embeds=skip[2:],
                                    guidance_scale=3.0)),
                      # What `python -m mmjax.generate` is tested with: one prompt.
                      ("cli", dict(prompt=PROMPTS[:1] * 2, negative_prompt=NEGATIVE[1:] * 2,
                                   guidance_scale=GUIDANCE))):
    common = dict(num_inference_steps=STEPS, latents=torch.from_numpy(latents), **kwargs)
    res[f"image_{tag}"] = pipe(**common, output_type="np").images
    res[f"final_latents_{tag}"] = pipe(**common, output_type="latent").images.numpy()
  pipe.scheduler.set_timesteps(STEPS)
  res["timesteps"] = pipe.scheduler.timesteps.numpy()
  return res


def scheduler_reference() -> dict:
  """Timesteps and trajectories x_{i+1} = step(out_i, t_i, x_i) for SCHEDULER_CASES."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  res = {}
  for case, (cls, config) in SCHEDULER_CASES.items():
    for n in SCHEDULER_STEPS:
      s = getattr(diffusers, cls)(**config)
      s.set_timesteps(n)
      rng = np.random.default_rng(n)
      x = torch.from_numpy(rng.standard_normal((1, 4, 2, 2), dtype=np.float32))
      x = x * s.init_noise_sigma
      outs = rng.standard_normal((n, 1, 4, 2, 2), dtype=np.float32)
      xs, inputs = [x.numpy()], []
      for i, t in enumerate(s.timesteps):
        inputs.append(s.scale_model_input(x, t).numpy())
        x = s.step(torch.from_numpy(outs[i]), t, x).prev_sample
        xs.append(x.numpy())
      res[f"{case}/{n}/timesteps"] = s.timesteps.numpy()
      res[f"{case}/{n}/model_outputs"] = outs
      res[f"{case}/{n}/inputs"] = np.stack(inputs)
      res[f"{case}/{n}/trajectory"] = np.stack(xs)
  return res


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mmjax-python", help="a Python with mmjax (and no torch) to check with")
  parser.add_argument("--out", default=str(OUT))
  args = parser.parse_args()
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__}
  print(versions)
  strings = tokenizer_strings()
  tokens = {"strings": strings}
  for name, spec in PIPELINES.items():
    build(name, spec, out)
    res = reference(name, spec, out)
    np.savez_compressed(out / f"{name}.npz", **res)
    tok = transformers.CLIPTokenizer.from_pretrained(out / name / "tokenizer")
    tokens[name] = tok(strings, padding="max_length", max_length=77,
                       truncation=True)["input_ids"]
    print(name, "timesteps", res["timesteps"])
  (out / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False))
  np.savez_compressed(out / "schedulers.npz", **scheduler_reference())
  (out / "manifest.json").write_text(json.dumps(
      {"versions": versions, "prompts": PROMPTS, "negative_prompts": NEGATIVE, "steps": STEPS,
       "guidance": GUIDANCE, "clip_skip_guidance": 3.0,
       "schedulers": {k: [c, cfg] for k, (c, cfg) in SCHEDULER_CASES.items()},
       "scheduler_steps": list(SCHEDULER_STEPS),
       "tolerances": {"unet": UNET_TOLERANCE, "image": IMAGE_TOLERANCE}}, indent=1))
  if args.mmjax_python:
    check = subprocess.run([args.mmjax_python, "-m", "pytest", "-q", "-x",
                            str(REPO / "tests" / "test_sd_pipeline.py")], cwd=REPO)
    if check.returncode:
      sys.exit("mmjax does not reproduce diffusers' outputs: see the test failures above.")
    print("mmjax reproduces diffusers' outputs on every fixture.")


if __name__ == "__main__":
  main()
