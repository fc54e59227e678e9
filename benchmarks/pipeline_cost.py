r"""Host CPU time the MNIST input path costs per batch, as one JSON line.

  python benchmarks/pipeline_cost.py --batch 128
  python benchmarks/pipeline_cost.py --batch 128 --global-arrays

Draws `--batches` batches from the experiment's real `task.train_dataset` (Grain, its
reading thread included) and hands each to what the trainer's step takes
(`parallel.step_batch`; with `--global-arrays`, `parallel.global_batch`, the
multi-process path), with no training. Every CPU-microsecond counted here (all threads
of the process, `time.process_time`) is taken from the train step on a machine whose
cores the step already uses. Prints the medians of `--repeats`: CPU and wall time per
batch.
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
  parser.add_argument("--batches", type=int, default=400)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--global-arrays", action="store_true",
                      help="time parallel.global_batch (make_array_from_process_local_data)")
  args = parser.parse_args()

  import jax
  from experiments import mnist_lenet
  from mmjax import tasks
  from mmjax.data import batching
  from mmjax import parallel

  config = mnist_lenet.get_config()
  config.global_batch_size = args.batch
  mesh = parallel.make_mesh()
  task = tasks.get_task(config, mesh)
  task.setup()
  to_step = parallel.global_batch if args.global_arrays else parallel.step_batch
  train_iter = iter(task.train_dataset(batching.Sharding()))
  for _ in range(20):  # Warm-up: the reading thread started, the buffer filled.
    to_step(next(train_iter), mesh)

  cpu, wall = [], []
  for _ in range(args.repeats):
    time.sleep(0.2)  # Let the reading thread refill its buffer, as it does during a step.
    c, w = time.process_time(), time.perf_counter()
    for _ in range(args.batches):
      batch = to_step(next(train_iter), mesh)
    jax.block_until_ready(batch)
    cpu.append((time.process_time() - c) / args.batches * 1e6)
    wall.append((time.perf_counter() - w) / args.batches * 1e6)
  print(json.dumps({
      "batch": args.batch, "to_step": to_step.__name__, "devices": jax.device_count(),
      "cpu_us_per_batch": round(statistics.median(cpu), 1),
      "wall_us_per_batch": round(statistics.median(wall), 1),
      "cpu_us_repeats": [round(x, 1) for x in cpu],
  }))


if __name__ == "__main__":
  main()
