r"""Latent-diffusion U-Net: train-step compile time and images/s, sampler too; one JSON line.

  python benchmarks/ldm_throughput.py                 # the experiment's U-Net and text tower
  python benchmarks/ldm_throughput.py --batch 256 --steps 10

Uses the diffusion task's loss (U-Net + text Transformer, noise, targets) and the
trainer's jitted step (`trainer.create_train_state`, `trainer.jit_train_step`) on random
8x8x4 latents and real caption tokens; no autoencoder run is needed. Also compiles the
experiment's sampler (DDIM, classifier-free guidance: a doubled batch per step) and
times one call of it on `--samples` prompts.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--samples", type=int, default=200)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments import ldm_mnist
  from mmjax import diffusion
  from mmjax.data import tokenizer as tokenizer_lib
  from mmjax.models.text import TextTransformer
  from mmjax.models.unet import UNet
  from mmjax.tasks import ldm
  from mmjax.train import sharding, trainer

  class SyntheticLatentDiffusionTask(ldm.LatentDiffusionTask):
    """The diffusion task's model, loss and sampler on random latents: no first stage."""

    def setup(self):
      self.text_encoder = TextTransformer(**ldm.module_kwargs(self.config.text))
      self.frozen_text = None
      self.unet = UNet(**ldm.module_kwargs(self.config.unet),
                       context_dim=self.text_encoder.width)
      self.latent_shape, self.latent_scale = (8, 8, 4), 1.0

  config = ldm_mnist.get_config("stage=diffusion")
  config.global_batch_size = args.batch
  mesh = sharding.make_mesh()
  task = SyntheticLatentDiffusionTask(config, mesh)
  task.setup()
  t = time.perf_counter()
  state, opt = trainer.create_train_state(config, task, mesh)
  init_s = time.perf_counter() - t
  tokenizer = tokenizer_lib.ByteTokenizer(max_len=config.text.max_len)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, args.batch)
  batch = sharding.global_batch({
      "mean": rng.standard_normal((args.batch, 8, 8, 4), np.float32),
      "logvar": np.full((args.batch, 8, 8, 4), -6.0, np.float32),
      "tokens": tokenizer.encode([config.prompt.format(y) for y in labels]),
  }, mesh)

  t = time.perf_counter()
  step = trainer.jit_train_step(task, opt, mesh).lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, _ = step(state, batch)  # Warm-up.
  jax.block_until_ready(state)
  rates = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for _ in range(args.steps):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
    rates.append(args.steps * args.batch / (time.perf_counter() - t))
  images_per_sec = statistics.median(rates)

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
  sampler_first_call_s = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(sampler(variables, jax.random.PRNGKey(1), context, empty, 4.0))
  sample_s = time.perf_counter() - t

  print(json.dumps({
      "model": "ldm_mnist U-Net + text", "batch": args.batch, "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "unet_params": int(sum(x.size for x in jax.tree.leaves(state.params["unet"]))),
      "images_per_sec": round(images_per_sec, 1),
      "step_ms": round(1000 * args.batch / images_per_sec, 1),
      "init_s": round(init_s, 2), "compile_s": round(compile_s, 2),
      "gflops_per_step": round(float(cost.get("flops", 0.0)) / 1e9, 2),
      "achieved_gflops": round(float(cost.get("flops", 0.0)) / 1e9 * images_per_sec / args.batch, 1),
      "sampler_steps": s.num_steps, "samples": args.samples,
      "sampler_compile_and_first_call_s": round(sampler_first_call_s, 2),
      "samples_per_sec": round(args.samples / sample_s, 1),
  }))


if __name__ == "__main__":
  main()
