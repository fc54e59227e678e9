r"""Latent-diffusion U-Net: train-step compile time and images/s, sampler too; one JSON line.

  python benchmarks/ldm_throughput.py                 # the experiment's U-Net and text tower
  python benchmarks/ldm_throughput.py --batch 256 --steps 10
  python benchmarks/ldm_throughput.py --shapes sd --batch 1 --compile-only
  python benchmarks/ldm_throughput.py --shapes sd --batch 64 --dtype bfloat16 --remat full

`--shapes sd` is Stable Diffusion 1.x's U-Net: 64x64x4 latents, channels
320/640/1280/1280, two residual blocks per level, spatial transformers at the first three
levels cross-attending to a 77x768 context (here from a one-layer 768-wide text tower,
frozen: `config.frozen`), 8 heads, 32 groups; no sampler timing. `--dtype`, `--remat`,
`--accum` and `--fsdp` set config.dtype, config.remat, config.grad_accum_steps and
config.mesh.fsdp. Prints TFLOP/s per device, MFU (where the device's peak is known) and
XLA's memory analysis of the step (bytes per device).

Uses the diffusion task's loss (U-Net + text Transformer, noise, targets) and the
trainer's jitted step (`trainer.create_train_state`, `trainer.jit_train_step`) on random
8x8x4 latents and real caption tokens; no autoencoder run is needed. Also compiles the
experiment's sampler (DDIM, classifier-free guidance: a doubled batch per step) and
times one call of it on `--samples` prompts (`--samples 0`: no sampler).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import common  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--samples", type=int, default=200)
  parser.add_argument("--shapes", default="mnist", choices=["mnist", "sd"])
  common.add_scale_flags(parser)
  args = parser.parse_args()
  host_malloc = common.start_host(args.cpu_devices)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments import ldm_mnist
  from mmjax import diffusion
  from mmjax.data import tokenizer as tokenizer_lib
  from mmjax.models.text import TextTransformer
  from mmjax.models.unet import UNet
  from mmjax.tasks import ldm
  from mmjax import parallel
  from mmjax.train import throughput, trainer

  class SyntheticLatentDiffusionTask(ldm.LatentDiffusionTask):
    """The diffusion task's model, loss and sampler on random latents: no first stage."""

    def setup(self):
      options = {k: v for k, v in self.options.items() if k != "scan_layers"}
      self.text_encoder = TextTransformer(**ldm.module_kwargs(self.config.text), **options)
      self.frozen_text = None
      self.unet = UNet(**ldm.module_kwargs(self.config.unet),
                       context_dim=self.text_encoder.width, **options)
      self.latent_shape, self.latent_scale = latent_shape, 1.0

  config = ldm_mnist.get_config("stage=diffusion")
  latent_shape = (8, 8, 4)
  if args.shapes == "sd":
    latent_shape = (64, 64, 4)
    config.unet = dict(channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                       attention_resolutions=(1, 2, 4), num_heads=8, groups=32)
    config.text = dict(width=768, depth=1, num_heads=12, mlp_dim=3072, max_len=77)
    config.frozen = ("text/.*",)
  mesh = common.apply_scale_flags(config, args)
  task = SyntheticLatentDiffusionTask(config, mesh)
  task.setup()
  t = time.perf_counter()
  state, opt = trainer.create_train_state(config, task, mesh)
  init_s = time.perf_counter() - t
  tokenizer = tokenizer_lib.ByteTokenizer(max_len=config.text.max_len)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, args.batch)
  batch = parallel.global_batch({
      "mean": rng.standard_normal((args.batch, *latent_shape), np.float32),
      "logvar": np.full((args.batch, *latent_shape), -6.0, np.float32),
      "tokens": tokenizer.encode([config.prompt.format(y) for y in labels]),
  }, mesh)

  step, compile_s, compile_profile = common.compile_step(
      args, trainer.jit_train_step(task, opt, mesh, jax.tree.map(lambda x: x.sharding, state)),
      state, batch)
  flops = throughput.step_flops(step)  # Per device.
  row = {"shapes": args.shapes, "batch": args.batch, "dtype": args.dtype,
         "remat": args.remat, "accum": args.accum, "fsdp": args.fsdp,
         "devices": jax.device_count(), "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind, "host_malloc": host_malloc,
         "unet_params": int(sum(x.size for x in jax.tree.leaves(state.params["unet"]))),
         "init_s": round(init_s, 2), "compile_s": round(compile_s, 2),
         "gflops_per_step_per_device": round(flops / 1e9, 2), **common.memory_row(step),
         **compile_profile}
  if args.compile_only:
    print(json.dumps(row))
    return
  images_per_sec, state = common.median_rate(step, state, batch, args.steps, args.repeats,
                                             args.batch)

  rates = throughput.rates(images_per_sec / args.batch, args.batch, flops,
                           throughput.peak_tflops(config))
  row.update({"images_per_sec": round(images_per_sec, 1),
              "step_ms": round(1000 * args.batch / images_per_sec, 1),
              "tflops_per_device": round(rates.get("train/tflops_per_device", 0.0), 4),
              "mfu": round(rates["train/mfu"], 4) if "train/mfu" in rates else None})
  profile, state = common.profile_row(args, step, state, batch)
  row.update(profile)
  if args.shapes == "mnist" and args.samples:
    row.update(_time_sampler(args, config, task, state, tokenizer))
  print(json.dumps(row))


def _time_sampler(args, config, task, state, tokenizer) -> dict:
  """The experiment's sampler: compile + first call, and samples/s of a second call."""
  import jax
  import jax.numpy as jnp
  from mmjax import diffusion
  s = config.sampling
  sampler = diffusion.make_sampler(
      lambda v, x, t, c: task.unet.apply(v, x, t, c), task.schedule, task.latent_shape,
      num_steps=s.num_steps, method=s.method, eta=s.eta,
      prediction_type=config.diffusion.prediction_type)
  tokens = tokenizer.encode([config.prompt.format(i % 10) for i in range(args.samples)])
  context = task.context(state.params, jnp.asarray(tokens))
  empty = task.context(state.params, jnp.asarray(tokenizer.encode([""])))
  variables = {"params": state.params["unet"]}
  t = time.perf_counter()
  jax.block_until_ready(sampler(variables, jax.random.PRNGKey(0), context, empty, 2.0))
  first_call_s = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(sampler(variables, jax.random.PRNGKey(1), context, empty, 4.0))
  sample_s = time.perf_counter() - t
  return {"sampler_steps": s.num_steps, "samples": args.samples,
          "sampler_compile_and_first_call_s": round(first_call_s, 2),
          "samples_per_sec": round(args.samples / sample_s, 1)}


if __name__ == "__main__":
  main()
