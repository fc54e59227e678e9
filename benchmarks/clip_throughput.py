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
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

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
  add_scale_flags(parser)
  args = parser.parse_args()
  host_malloc = start_host(args.cpu_devices)

  import jax
  from experiments import clip_mnist
  from mmjax.tasks import clip as clip_task
  from mmjax.train import sharding, throughput, trainer

  shapes = SHAPES[args.shapes]
  config = clip_mnist.get_config(f"loss={args.loss}")
  config.model.update(shapes["model"])
  config.scan_layers = args.scan_layers
  config.model.patch_dropout = args.patch_dropout
  mesh = apply_scale_flags(config, args)
  task = clip_task.ClipTask(config, mesh)  # Its model and loss; no dataset (no setup()).
  task.model_image_shape = shapes["image_shape"]  # What setup() reads from the dataset.
  state, opt = trainer.create_train_state(config, task, mesh)
  rng = jax.random.PRNGKey(0)
  batch = sharding.global_batch({
      "image": jax.device_get(jax.random.normal(rng, (args.batch, *shapes["image_shape"]))),
      "tokens": jax.device_get(jax.random.randint(rng, (args.batch, config.model.max_text_len),
                                                  3, 259)),
  }, mesh)

  step, compile_s, compile_profile = compile_step(
      args, trainer.jit_train_step(task, opt, mesh, jax.tree.map(lambda x: x.sharding, state)),
      state, batch)
  flops = throughput.step_flops(step)  # Per device.
  if args.compile_only:
    print(json.dumps({"shapes": args.shapes, "batch": args.batch, "dtype": args.dtype,
                      "remat": args.remat, "scan_layers": args.scan_layers,
                      "accum": args.accum, "fsdp": args.fsdp, "devices": jax.device_count(),
                      "backend": jax.default_backend(), "compile_s": round(compile_s, 2),
                      "gflops_per_step_per_device": round(flops / 1e9, 2),
                      **memory_row(step), **compile_profile}))
    return
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
  row.update(memory_row(step))
  row.update(compile_profile)
  profile, state = profile_row(args, step, state, batch)
  row.update(profile)
  print(json.dumps(row))


def add_scale_flags(parser):
  """The flags both step benchmarks share: precision, remat, accumulation, mesh, MFU."""
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  parser.add_argument("--remat", default="none", help="config.remat: none, full or a policy")
  parser.add_argument("--accum", type=int, default=1, help="config.grad_accum_steps")
  parser.add_argument("--fsdp", type=int, default=1, help="config.mesh.fsdp")
  parser.add_argument("--compile-only", action="store_true",
                      help="compile, print compile time, FLOPs and memory; run no step")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's peak dense TFLOP/s, for MFU")
  parser.add_argument("--cpu-devices", type=int, default=None,
                      help="launch.py's --cpu_devices: split the CPU into N devices")
  parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                      help="also profile STEPS steps: time per model part (step_profile.py)")
  parser.add_argument("--profile-top", type=int, default=0, help="and list the N costliest ops")
  parser.add_argument("--compile-profile", action="store_true",
                      help="also say where the compile time goes (step_profile.py)")


def compile_step(args, jitted, state, batch) -> tuple[object, float, dict]:
  """(compiled step, seconds to trace, lower and compile it, and with --compile-profile
  {"compile_profile": step_profile.compile_breakdown(...)}, else {})."""
  t = time.perf_counter()
  lowered = jitted.lower(state, batch)
  if not args.compile_profile:
    return lowered.compile(), time.perf_counter() - t, {}
  from benchmarks import step_profile
  compiled, profile = step_profile.compile_breakdown(lowered)
  return compiled, time.perf_counter() - t, {"compile_profile": profile}


def profile_row(args, compiled, state, batch) -> tuple[dict, object]:
  """With --profile: {"profile": step_profile.breakdown(...)} of `compiled`, else {};
  and the state after the profiled steps (the step donates its input state)."""
  if not args.profile:
    return {}, state
  import jax
  from benchmarks import step_profile
  state = [state]

  def run():
    state[0], _ = compiled(state[0], batch)
    jax.block_until_ready(state[0])
  profile = step_profile.breakdown(compiled, run, args.profile, args.profile_top)
  return {"profile": profile}, state[0]


def start_host(cpu_devices: int | None = None, reuse: bool = True) -> str:
  """launch.py's host set-up (mmjax/train/host.py), before JAX starts: "reuse", or
  "default" where glibc's defaults stay (config.reuse_host_memory False,
  MMJAX_HOST_MALLOC=default, not glibc)."""
  from mmjax.train import host
  if cpu_devices is not None:
    host.split_cpu(cpu_devices)
  return "reuse" if reuse and host.reuse_freed_memory() else "default"


def apply_scale_flags(config, args):
  """Sets the config fields of `add_scale_flags`' flags; returns the mesh, batch checked."""
  from mmjax.train import sharding
  config.global_batch_size = args.batch
  config.dtype, config.remat, config.grad_accum_steps = args.dtype, args.remat, args.accum
  config.mesh.fsdp = args.fsdp
  config.peak_tflops_per_device = args.peak_tflops
  mesh = sharding.make_mesh(shape=config.mesh)
  sharding.check_batch_size(args.batch, mesh, accum_steps=args.accum)
  return mesh


def memory_row(compiled) -> dict:
  """XLA's memory analysis of a compiled step: bytes per device (arguments + outputs +
  temporaries - donated aliases) and the temporaries alone (activations)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {"bytes_per_device": int(m.argument_size_in_bytes + m.output_size_in_bytes
                                  + m.temp_size_in_bytes - m.alias_size_in_bytes),
          "temp_bytes_per_device": int(m.temp_size_in_bytes)}


if __name__ == "__main__":
  main()
