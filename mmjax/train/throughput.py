"""Throughput in the logs (examples/s, TFLOP/s per device, MFU) and profiler windows.

The train step's FLOPs are counted once, from XLA's cost analysis of the compiled step
(the program each device runs, so already per device). On GPUs that analysis leaves
out the work done inside cuBLAS/cuDNN calls, so there `train/tflops_per_device` and
`train/mfu` are lower bounds; on CPUs and TPUs they count the whole step.
"""
import logging
import os

import jax

# Dense bfloat16 peak TFLOP/s per device, by the start of `jax.Device.device_kind`
# (vendor figures). `config.peak_tflops_per_device` overrides it, or sets it for any
# other device (CPUs have no entry: no MFU unless it is set).
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def step_flops(compiled) -> float:
  """FLOPs of one call of a compiled step on one device, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def peak_tflops(config, device=None) -> float | None:
  """The device's peak dense TFLOP/s: the config's, else the table's, else None."""
  if config.get("peak_tflops_per_device"):
    return float(config.peak_tflops_per_device)
  kind = (device or jax.devices()[0]).device_kind
  for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_TFLOPS[prefix]
  return None


def rates(steps_per_sec: float, global_batch_size: int, flops_per_step: float,
          peak: float | None) -> dict[str, float]:
  """The log row's throughput fields, from the measured steps per second."""
  out = {"train/examples_per_sec": steps_per_sec * global_batch_size}
  if flops_per_step:
    tflops = steps_per_sec * flops_per_step / 1e12
    out["train/tflops_per_device"] = tflops
    if peak:
      out["train/mfu"] = tflops / peak
  return out


class ProfileWindow:
  """A `jax.profiler` trace of steps [start, start + count) into `<workdir>/profile`,
  for TensorBoard's profile plugin; `config.profile_steps = (start, count)`, or () for none."""

  def __init__(self, profile_steps, workdir: str):
    steps = tuple(profile_steps or ())
    if steps and (len(steps) != 2 or steps[0] < 1 or steps[1] < 1):
      raise ValueError(f"config.profile_steps={steps}: give (first step, number of steps), "
                       f"both >= 1, or () for no trace.")
    self.start, self.count = steps if steps else (0, 0)
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def before_step(self, step: int):
    if self.count and step == self.start and jax.process_index() == 0:
      logging.info("Profiling steps %d-%d into %s", step, step + self.count - 1, self.directory)
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, state):
    if self.active and step == self.start + self.count - 1:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
