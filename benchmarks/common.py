"""What the step benchmarks share: flags, host set-up, compiling, timing loops, memory
and profile rows. Used by clip_throughput.py, ldm_throughput.py and train_throughput.py."""
import itertools
import statistics
import time


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
  from mmjax import parallel
  config.global_batch_size = args.batch
  config.dtype, config.remat, config.grad_accum_steps = args.dtype, args.remat, args.accum
  config.mesh.fsdp = args.fsdp
  config.peak_tflops_per_device = args.peak_tflops
  mesh = parallel.make_mesh(shape=config.mesh)
  parallel.check_batch_size(args.batch, mesh, accum_steps=args.accum)
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


def examples_per_sec(step, state, batches, steps: int, batch_size: int) -> tuple[float, object]:
  """Runs `steps` calls of the compiled `step`, each on next(`batches`) (made inside the
  timed loop), then waits for the state: (examples per second, the final state)."""
  import jax
  t = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, next(batches))
  jax.block_until_ready(state)
  return steps * batch_size / (time.perf_counter() - t), state


def median_rate(step, state, batch, steps: int, repeats: int,
                batch_size: int) -> tuple[float, object]:
  """One warm-up step, then `repeats` timings of `steps` steps on the fixed `batch`:
  (the median examples per second, the final state)."""
  import jax
  state, _ = step(state, batch)  # Warm-up.
  jax.block_until_ready(state)
  rates = []
  for _ in range(repeats):
    rate, state = examples_per_sec(step, state, itertools.repeat(batch), steps, batch_size)
    rates.append(rate)
  return statistics.median(rates), state
