"""Stable Diffusion speed: mmjax's generation loop vs diffusers', and an SD-1.5 U-Net step.

  # mmjax (JAX) generation on a pipeline folder, one compile excluded:
  python benchmarks/sd_generate.py --mode=jax --pipeline=FOLDER --num_images=4 --steps=10
  # diffusers on the same folder and settings (an environment with torch + diffusers):
  python benchmarks/sd_generate.py --mode=diffusers --pipeline=FOLDER --num_images=4 --steps=10
  # one U-Net call of a guided step (batch 2 x num_images), jax or diffusers:
  python benchmarks/sd_generate.py --mode=jax_unet --pipeline=FOLDER --num_images=4
  # an SD-1.5-shaped U-Net (random weights), batch 1, 64x64 latents: compile + step time:
  python benchmarks/sd_generate.py --mode=unet_sd15

Each prints one JSON line. Both generation modes start from the same latents
(seed 0, NumPy) with guidance 7.5 and the folder's scheduler.
"""
import argparse
import json
import time

import numpy as np


def _timed(call, repeats: int) -> tuple[float, float]:
  """(seconds of the first call, which compiles; the best of `repeats` calls after it)."""
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return first, min(times)


def _latents(n, size, channels=4):
  return np.random.default_rng(0).standard_normal((n, size, size, channels), dtype=np.float32)


def run_jax(args):
  import jax  # pylint: disable=import-outside-toplevel
  from mmjax.pipelines import stable_diffusion  # pylint: disable=import-outside-toplevel
  pipe = stable_diffusion.StableDiffusion.from_pretrained(args.pipeline)
  latents = _latents(args.num_images, args.latent_size or pipe.sample_size)
  prompts = ["a photo of a cat"] * args.num_images
  first, best = _timed(
      lambda: pipe.generate(prompts, "blurry", num_steps=args.steps, latents=latents),
      args.repeats)
  return {"mode": "jax", "devices": jax.device_count(), "backend": jax.default_backend(),
          "first_call_s": round(first, 3), "best_s": round(best, 4),
          "images_per_s": round(args.num_images / best, 3)}


def run_diffusers(args):
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      args.pipeline, torch_dtype=torch.float32, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  size = args.latent_size or pipe.unet.config.sample_size
  latents = torch.from_numpy(_latents(args.num_images, size).transpose(0, 3, 1, 2).copy())
  call = lambda: pipe(["a photo of a cat"] * args.num_images, negative_prompt=["blurry"] *
                      args.num_images, num_inference_steps=args.steps, latents=latents,
                      output_type="np")
  first, best = _timed(call, args.repeats)
  return {"mode": "diffusers", "torch_threads": torch.get_num_threads(),
          "first_call_s": round(first, 3), "best_s": round(best, 4),
          "images_per_s": round(args.num_images / best, 3)}


def run_jax_unet(args):
  """One U-Net call on the pipeline, batch 2 x num_images (a guided step's), best of repeats."""
  import jax  # pylint: disable=import-outside-toplevel
  from mmjax.pipelines import stable_diffusion  # pylint: disable=import-outside-toplevel
  pipe = stable_diffusion.StableDiffusion.from_pretrained(args.pipeline)
  n, size = 2 * args.num_images, args.latent_size or pipe.sample_size
  x = _latents(n, size)
  t = np.full((n,), 500.0, np.float32)
  context = np.zeros((n, 77, pipe.unet.cross_attention_dim), np.float32)
  call = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
  _, best = _timed(lambda: call(pipe.unet_params, x, t, context).block_until_ready(),
                   args.repeats)
  return {"mode": "jax_unet", "batch": n, "call_s": round(best, 4)}


def run_diffusers_unet(args):
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  unet = diffusers.UNet2DConditionModel.from_pretrained(args.pipeline, subfolder="unet")
  n, size = 2 * args.num_images, args.latent_size or unet.config.sample_size
  x = torch.from_numpy(_latents(n, size).transpose(0, 3, 1, 2).copy())
  t = torch.full((n,), 500.0)
  context = torch.zeros((n, 77, unet.config.cross_attention_dim))
  with torch.no_grad():
    _, best = _timed(lambda: unet(x, t, encoder_hidden_states=context), args.repeats)
  return {"mode": "diffusers_unet", "batch": n, "torch_threads": torch.get_num_threads(),
          "call_s": round(best, 4)}


def run_unet_sd15(args):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmjax.models import sd_unet  # pylint: disable=import-outside-toplevel
  model = sd_unet.UNet2DConditionModel(**sd_unet.SD15)
  x = jnp.zeros((1, 64, 64, 4))
  t = jnp.array([500.0])
  context = jnp.zeros((1, 77, 768))
  params = jax.jit(model.init)(jax.random.key(0), x, t, context)
  count = sum(p.size for p in jax.tree.leaves(params))
  step = jax.jit(model.apply)
  start = time.perf_counter()
  compiled = step.lower(params, x, t, context).compile()
  compile_s = time.perf_counter() - start
  _, best = _timed(lambda: compiled(params, x, t, context).block_until_ready(), args.repeats)
  return {"mode": "unet_sd15", "parameters": int(count), "backend": jax.default_backend(),
          "compile_s": round(compile_s, 2), "step_s": round(best, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", required=True, choices=(
      "jax", "diffusers", "jax_unet", "diffusers_unet", "unet_sd15"))
  parser.add_argument("--pipeline", help="a diffusers pipeline folder")
  parser.add_argument("--num_images", type=int, default=4)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--latent_size", type=int, help="default: the U-Net's sample_size")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  run = {"jax": run_jax, "diffusers": run_diffusers, "jax_unet": run_jax_unet,
         "diffusers_unet": run_diffusers_unet, "unet_sd15": run_unet_sd15}[args.mode]
  print(json.dumps(dict(run(args), **{k: v for k, v in vars(args).items() if v is not None})))


if __name__ == "__main__":
  main()
