r"""Training throughput of the trainer's real jitted step, as one JSON line.

  python benchmarks/train_throughput.py --model lenet5 --batch 128
  python benchmarks/train_throughput.py --model small_cnn_flax --batch 128
  python benchmarks/train_throughput.py --model lenet5 --batch 128 --dtype bfloat16

Builds the MNIST experiment's task, state and train step exactly as launch.py does
(`trainer.create_train_state`, `trainer.jit_train_step`), compiles once, warms up,
then times `--repeats` runs of `--steps` steps on one fixed batch (step only) and
on fresh batches from the Grain pipeline (end to end), alternating. Prints the
medians, and `pipeline_ratio`: the median over repeats of end to end / step only.

`--model lenet5_flax` / `small_cnn_flax` time the same trainer step with the model
swapped for its plain-Flax twin (`benchmarks/plain_flax.py`: flax.linen.Conv and
pooling instead of mmjax.nn), the reference that mmjax's lowering has to beat.

Two FLOP counts per image: `flops_per_image`, XLA's cost analysis of the compiled step
(what it executes: with mmjax.nn it counts the band's zero multiplies, and a loop over
pieces of the batch only once), and `model_flops_per_image`, the same analysis of the
plain-Flax twin's step (XLA's convolution: the model's own multiply-adds), on which
`achieved_gflops` is based.

`--dtype` sets config.dtype (the computation dtype; parameters stay float32).
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import common  # pylint: disable=wrong-import-position


def _model_flops(config, task, mesh, batch, base_model) -> float:
  """FLOPs of the train step with the plain-Flax twin of the model (lowered, not run)."""
  from benchmarks import plain_flax
  from mmjax.train import throughput, trainer
  model = task.model
  task.model = {name: cls for name, cls in plain_flax.MODELS.values()}[base_model]()
  try:
    state, opt = trainer.create_train_state(config, task, mesh)
    return throughput.step_flops(trainer.jit_train_step(task, opt, mesh).lower(state, batch))
  finally:
    task.model = model


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="lenet5",
                      choices=["lenet5", "small_cnn", "lenet5_flax", "small_cnn_flax"])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  args = parser.parse_args()
  from experiments import mnist_lenet
  host_malloc = common.start_host(reuse=mnist_lenet.get_config().reuse_host_memory)  # As launch.py.

  import jax
  from benchmarks import plain_flax
  from mmjax import tasks
  from mmjax.data import batching
  from mmjax import parallel
  from mmjax.train import throughput, trainer

  base_model, plain_model = plain_flax.MODELS.get(args.model, (args.model, None))
  config = mnist_lenet.get_config(f"model={base_model}")
  config.global_batch_size = args.batch
  config.dtype = args.dtype
  mesh = parallel.make_mesh()
  task = tasks.get_task(config, mesh)
  task.setup()
  if plain_model is not None:
    task.model = plain_model()
  state, opt = trainer.create_train_state(config, task, mesh)
  train_iter = iter(task.train_dataset(batching.Sharding()))
  batch = parallel.global_batch(next(train_iter), mesh)

  t = time.perf_counter()
  step = trainer.jit_train_step(task, opt, mesh).lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  flops_per_image = throughput.step_flops(step) / args.batch
  model_flops_per_image = _model_flops(config, task, mesh, batch, base_model) / args.batch

  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)

  fixed = itertools.repeat(batch)
  fresh = (parallel.step_batch(b, mesh) for b in train_iter)  # Made inside the timed loop.
  step_only, end_to_end = [], []
  for _ in range(args.repeats):  # Alternate, so drift in machine load hits both alike.
    for batches, rates in ((fixed, step_only), (fresh, end_to_end)):
      rate, state = common.examples_per_sec(step, state, batches, args.steps, args.batch)
      rates.append(rate)
  ips = statistics.median(step_only)
  # Each end-to-end repeat against the step-only repeat just before it: drifts in
  # machine load, slower than a repeat, cancel out of the ratio.
  pipeline_ratio = statistics.median(e / s for s, e in zip(step_only, end_to_end))
  print(json.dumps({
      "model": args.model, "batch": args.batch, "dtype": args.dtype,
      "devices": jax.device_count(),
      "backend": jax.default_backend(), "host_malloc": host_malloc,
      "images_per_sec": round(ips, 1),
      "pipeline_images_per_sec": round(statistics.median(end_to_end), 1),
      "pipeline_ratio": round(pipeline_ratio, 3),
      "step_ms": round(1000 * args.batch / ips, 3),
      "compile_s": round(compile_s, 2),
      "flops_per_image": round(flops_per_image),
      "model_flops_per_image": round(model_flops_per_image),
      "achieved_gflops": round(model_flops_per_image * ips / 1e9, 2),
      "repeats": [round(x, 1) for x in step_only],
  }))


if __name__ == "__main__":
  main()
