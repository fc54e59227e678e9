"""Where a compiled step spends its time: a per-op profile grouped by model part.

`breakdown(compiled, run, steps)` runs `run()` (one step, blocking) `steps` times under
`jax.profiler.trace`, reads the trace back (`jax.profiler.ProfileData`), finds each
executed XLA op's instruction in the compiled HLO, and sums the op times by direction
(forward, backward, update: the optimizer and everything outside the model's
differentiation; "unlabelled": ops XLA made without source, such as a convolution's
kernel gradient) and by part, from the instruction's `op_name` (the Flax module path and
the primitive): attention (projections, logits, softmax, weighted sum), mlp, norm
(LayerNorm, GroupNorm), conv, other. Used by `clip_throughput.py --profile` and
`ldm_throughput.py --profile`.

Times are of the ops the XLA CPU runtime executed (its executor threads), per step; the
gap to the step's wall time is dispatch and waiting.

`compile_breakdown(lowered)` compiles under the profiler and says where XLA's CPU
compile time goes (`--compile-profile` of the same two scripts).
"""
import collections
import glob
import re
import tempfile
import time

PARTS = (("attention", r"attention|/attn\d?/"), ("mlp", r"/mlp/|/ff/|/fc\d/"),
         ("norm", r"/(ln\w*|norm\w*|layer_norm|group_norm)/"),
         ("conv", r"conv_general_dilated|/convolution$"))


def _part(op_name: str) -> str:
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return part
  return "other"


def _direction(op_name: str) -> str:
  if op_name.startswith("unlabelled/"):  # XLA-made, e.g. a convolution's kernel gradient.
    return "unlabelled"
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def op_names(hlo_text: str) -> dict:
  """Instruction name -> its op_name metadata, over every computation of the module; a
  fusion without one gets the first op_name inside the computation it calls."""
  names, calls, inside, computation = {}, {}, {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      computation = header.group(1)
    m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = ", line)
    if not m:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if op_name:
      names.setdefault(m.group(1), op_name.group(1))
      inside.setdefault(computation, op_name.group(1))
    elif called:
      calls[m.group(1)] = called.group(1)
    if line.lstrip().startswith("ROOT") and not op_name:  # XLA's own: its opcode.
      opcode = re.search(r"= \S+ ([\w\-]+)\(", line)
      inside.setdefault(computation, f"unlabelled/{opcode.group(1) if opcode else '?'}")
  for name, computation in calls.items():
    names.setdefault(name, inside.get(computation, ""))
  return names


def breakdown(compiled, run, steps: int = 5, top: int = 0) -> dict:
  """{"wall_ms", "ops_ms", "by_direction_part": {"forward/attention": ms, ...},
  "ops_per_step": {"forward": n, ...}} per step (n: ops started); with `top`, also the
  `top` most expensive ops (ms, instruction, op_name)."""
  import jax  # pylint: disable=import-outside-toplevel
  names = op_names(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      t = time.perf_counter()
      for _ in range(steps):
        run()
      wall = time.perf_counter() - t
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  per_op, calls = collections.Counter(), collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):  # The threads that execute XLA's ops.
        continue
      for event in line.events:
        if not event.name.startswith("ThunkExecutor"):
          per_op[event.name] += event.duration_ns / 1e6 / steps
          calls[event.name] += 1 / steps
  groups, counts = collections.Counter(), collections.Counter()
  for op, ms in per_op.items():
    # "end: <op>": the completion of an op the runtime ran asynchronously (a YNN fusion).
    name = names.get(op.removeprefix("end: "), "")
    groups[f"{_direction(name)}/{_part(name)}"] += ms
    if not op.startswith("end: "):
      counts[_direction(name)] += calls[op]
  out = {"wall_ms": round(1000 * wall / steps, 1), "ops_ms": round(sum(per_op.values()), 1),
         "by_direction_part": {k: round(v, 1) for k, v in groups.most_common()},
         "ops_per_step": {k: round(v) for k, v in counts.most_common()}}
  if top:
    out["top_ops"] = [(round(ms, 2), op, names.get(op.removeprefix("end: "), "")[-100:])
                      for op, ms in per_op.most_common(top)]
  return out


# XLA CPU compiler events (their names in the profiler's trace) -> the keys reported.
COMPILE_EVENTS = (("PjRtCpuClient::Compile", "xla_compile_s"),
                  ("HLO passes", "hlo_passes_s"),
                  ("JitCompiler::Compile", "codegen_s"),
                  ("ThunkEmitter::EmitEntryComputation", "emit_entry_s"),
                  ("ThunkEmitter::ConsumeKernels", "consume_kernels_s"))


def compile_breakdown(lowered) -> tuple[object, dict]:
  """(compiled, {"xla_compile_s", "hlo_passes_s", "codegen_s", "kernels_compiled",
  "emit_entry_s", "consume_kernels_s", "entry_fusions": {direction: n}}).

  Seconds are wall time of the XLA CPU compiler's own trace events (those present; other
  backends and XLA versions name theirs differently). `codegen_s` is the compilation of
  `kernels_compiled` distinct fusions to machine code, spread over the codegen threads;
  `entry_fusions` counts the fusions the step runs, by direction (as `breakdown`).
  """
  import jax  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      compiled = lowered.compile()
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  seconds, kernels = collections.Counter(), 0
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        kernels += event.name == "FusionCompiler::Compile"
        for prefix, key in COMPILE_EVENTS:
          if event.name.startswith(prefix) and not line.name.startswith("tf_xla-cpu-codegen"):
            seconds[key] += event.duration_ns / 1e9
  text = compiled.as_text()
  names = op_names(text)
  entry = text[text.index("\nENTRY"):]
  fusions = collections.Counter(
      _direction(names.get(m.group(1), "unlabelled/"))
      for m in re.finditer(r"\n\s+(?:ROOT )?%?([\w.\-]+) = [^\n]*? fusion\(",
                           entry[:entry.find("\n}")]))
  out = {key: round(seconds[key], 2) for _, key in COMPILE_EVENTS if key in seconds}
  out.update(kernels_compiled=kernels, entry_fusions=dict(fusions.most_common()))
  return compiled, out
