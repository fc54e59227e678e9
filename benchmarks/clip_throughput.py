r"""CLIP train-step throughput (pairs/s) and compile time, as one JSON line.

  python benchmarks/clip_throughput.py                      # the CPU experiment's model
  python benchmarks/clip_throughput.py --shapes B/16 --batch 8 --steps 3 --repeats 2
  python benchmarks/clip_throughput.py --dtype bfloat16 --remat full

Uses the CLIP task's loss and the trainer's jitted step (`trainer.create_train_state`,
`trainer.jit_train_step`) on random inputs of the chosen shapes: `mnist` is the
experiment's config (28x28x1 images, its ViT and text tower); `B/16` is CLIP ViT-B/16's
(224x224x3 images, ViT-B/16, a 12-layer 512-wide text Transformer over 77 tokens).
`--dtype`, `--remat` and `--scan-layers` set config.dtype, config.remat and
config.scan_layers (see the README's "Mixed precision, remat and scanned layers").
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {
    "mnist": dict(image_shape=(28, 28, 1), model={}),
    "B/16": dict(image_shape=(224, 224, 3), model=dict(
        image_variant="B/16", text_width=512, text_depth=12, text_heads=8, text_mlp_dim=2048,
        max_text_len=77, embed_dim=512)),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="mnist", choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--loss", default="softmax", choices=["softmax", "sigmoid"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  parser.add_argument("--remat", default="none")
  parser.add_argument("--scan-layers", action="store_true")
  args = parser.parse_args()

  import jax
  from experiments import clip_mnist
  from mmjax.tasks import clip as clip_task
  from mmjax.train import sharding, trainer

  shapes = SHAPES[args.shapes]
  config = clip_mnist.get_config(f"loss={args.loss}")
  config.model.update(shapes["model"])
  config.global_batch_size = args.batch
  config.dtype, config.remat, config.scan_layers = args.dtype, args.remat, args.scan_layers
  mesh = sharding.make_mesh()
  task = clip_task.ClipTask(config, mesh)  # Its model and loss; no dataset (no setup()).
  task.image_shape = task.model_image_shape = shapes["image_shape"]
  state, opt = trainer.create_train_state(config, task, mesh)
  rng = jax.random.PRNGKey(0)
  batch = sharding.global_batch({
      "image": jax.device_get(jax.random.normal(rng, (args.batch, *shapes["image_shape"]))),
      "tokens": jax.device_get(jax.random.randint(rng, (args.batch, config.model.max_text_len),
                                                  3, 259)),
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
  pairs = statistics.median(rates)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(json.dumps({
      "shapes": args.shapes, "batch": args.batch, "loss": args.loss, "dtype": args.dtype,
      "remat": args.remat, "scan_layers": args.scan_layers,
      "devices": jax.device_count(), "backend": jax.default_backend(), "params": int(n_params),
      "pairs_per_sec": round(pairs, 2), "step_ms": round(1000 * args.batch / pairs, 1),
      "compile_s": round(compile_s, 2),
      "gflops_per_step": round(float(cost.get("flops", 0.0)) / 1e9, 2),
      "achieved_gflops": round(float(cost.get("flops", 0.0)) / 1e9 * pairs / args.batch, 1),
  }))


if __name__ == "__main__":
  main()
