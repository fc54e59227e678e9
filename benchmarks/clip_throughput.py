r"""CLIP train-step throughput, compile time, FLOPs, MFU and memory, as one JSON line.

  python benchmarks/clip_throughput.py                      # the CPU experiment's model
  python benchmarks/clip_throughput.py --shapes B/16 --batch 8 --steps 3 --repeats 2
  python benchmarks/clip_throughput.py --shapes B/16 --batch 256 --dtype bfloat16 \
      --fsdp 8 --remat full --accum 2 --scan-layers

Uses the CLIP task's loss and the trainer's jitted step (`trainer.create_train_state`,
`trainer.jit_train_step`) on random inputs of the chosen shapes: `mnist` is the
experiment's config (28x28x1 images, its ViT and text tower); `B/16` and `L/14` are
CLIP ViT-B/16's and ViT-L/14's (224x224x3 images, the ViT, a 12-layer text Transformer
over 77 tokens, 512 / 768 wide). `--patch-dropout P` drops that share of image patches
in training (FLIP; config.model.patch_dropout). `--dtype`, `--remat`, `--scan-layers` and `--accum` set
config.dtype, config.remat, config.scan_layers and config.grad_accum_steps; `--fsdp N`
is config.mesh.fsdp over all devices. "bytes_per_device" is XLA's memory analysis of
the compiled step (arguments + outputs + temporaries - donated aliases); "mfu" needs
the device's peak (mmjax.train.throughput.PEAK_TFLOPS, or --peak-tflops).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import common  # pylint: disable=wrong-import-position

SHAPES = {
    "mnist": dict(image_shape=(28, 28, 1), model={}),
    "B/16": dict(image_shape=(224, 224, 3), model=dict(
        image_variant="B/16", text_width=512, text_depth=12, text_heads=8, text_mlp_dim=2048,
        max_text_len=77, embed_dim=512)),
    "L/14": dict(image_shape=(224, 224, 3), model=dict(
        image_variant="L/14", text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072,
        max_text_len=77, embed_dim=768)),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="mnist", choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--loss", default="softmax", choices=["softmax", "sigmoid"])
  parser.add_argument("--scan-layers", action="store_true", help="config.scan_layers=True")
  parser.add_argument("--patch-dropout", type=float, default=0.0,
                      help="config.model.patch_dropout (FLIP): share of image patches dropped")
  common.add_scale_flags(parser)
  args = parser.parse_args()
  host_malloc = common.start_host(args.cpu_devices)

  import jax
  from experiments import clip_mnist
  from mmjax.tasks import clip as clip_task
  from mmjax import parallel
  from mmjax.train import throughput, trainer

  shapes = SHAPES[args.shapes]
  config = clip_mnist.get_config(f"loss={args.loss}")
  config.model.update(shapes["model"])
  config.scan_layers = args.scan_layers
  config.model.patch_dropout = args.patch_dropout
  mesh = common.apply_scale_flags(config, args)
  task = clip_task.ClipTask(config, mesh)  # Its model and loss; no dataset (no setup()).
  task.model_image_shape = shapes["image_shape"]  # What setup() reads from the dataset.
  state, opt = trainer.create_train_state(config, task, mesh)
  rng = jax.random.PRNGKey(0)
  batch = parallel.global_batch({
      "image": jax.device_get(jax.random.normal(rng, (args.batch, *shapes["image_shape"]))),
      "tokens": jax.device_get(jax.random.randint(rng, (args.batch, config.model.max_text_len),
                                                  3, 259)),
  }, mesh)

  step, compile_s, compile_profile = common.compile_step(
      args, trainer.jit_train_step(task, opt, mesh, jax.tree.map(lambda x: x.sharding, state)),
      state, batch)
  flops = throughput.step_flops(step)  # Per device.
  if args.compile_only:
    print(json.dumps({"shapes": args.shapes, "batch": args.batch, "dtype": args.dtype,
                      "remat": args.remat, "scan_layers": args.scan_layers,
                      "accum": args.accum, "fsdp": args.fsdp, "devices": jax.device_count(),
                      "backend": jax.default_backend(), "compile_s": round(compile_s, 2),
                      "gflops_per_step_per_device": round(flops / 1e9, 2),
                      **common.memory_row(step), **compile_profile}))
    return
  pairs, state = common.median_rate(step, state, batch, args.steps, args.repeats, args.batch)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  rates = throughput.rates(pairs / args.batch, args.batch, flops, throughput.peak_tflops(config))
  row = {
      "shapes": args.shapes, "batch": args.batch, "loss": args.loss, "dtype": args.dtype,
      "remat": args.remat, "scan_layers": args.scan_layers, "accum": args.accum, "fsdp": args.fsdp,
      "patch_dropout": args.patch_dropout, "devices": jax.device_count(), "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "host_malloc": host_malloc,
      "params": int(n_params),
      "pairs_per_sec": round(pairs, 2), "step_ms": round(1000 * args.batch / pairs, 1),
      "compile_s": round(compile_s, 2), "gflops_per_step_per_device": round(flops / 1e9, 2),
      "tflops_per_device": round(rates.get("train/tflops_per_device", 0.0), 4),
      "mfu": round(rates["train/mfu"], 4) if "train/mfu" in rates else None,
  }
  row.update(common.memory_row(step))
  row.update(compile_profile)
  profile, state = common.profile_row(args, step, state, batch)
  row.update(profile)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
