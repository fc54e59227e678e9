r"""Fine-tuned Stable Diffusion weights back into a diffusers pipeline folder.

  python -m mmjax.interop.sd_export --workdir=workdirs/sd_mnist --out=exported/sd_mnist

copies the run's `config.init_from` folder to `--out` and replaces the U-Net's and the
text encoder's weights (unet/diffusion_pytorch_model.safetensors,
text_encoder/model.safetensors) with the run's latest checkpoint (or `--step`; LoRA
adapters merged into their kernels), under the source files' own keys and dtypes; the VAE (always frozen in the sd task),
tokenizer, scheduler and configs are copied as they are. diffusers'
`StableDiffusionPipeline.from_pretrained` and `python -m mmjax.generate
--pretrained=<out>` read the result. With `--lora`, a LoRA run's adapters alone go to
`<out>/pytorch_lora_weights.safetensors` (mmjax.interop.sd_lora: what diffusers'
`load_lora_weights` and `python -m mmjax.generate --lora=<out>` read). In Python: `export_pipeline(source, out, params)`.
"""
import os
import shutil
import sys

import numpy as np

from mmjax.interop import sd_pipeline
from mmjax.interop.common import CheckpointError

# Part -> (the weights file's stem, the prefix transformers 4 puts on the text encoder).
WEIGHTS = {"unet": "diffusion_pytorch_model", "text_encoder": "model"}


def to_state_dict(params: dict, like: dict, where: str) -> dict:
  """mmjax parameters -> a state dict with exactly `like`'s keys, shapes and dtypes.

  The inverse of sd_pipeline.to_params: convolution kernels [kh, kw, in, out] ->
  [out, in, kh, kw], Dense kernels transposed; keys mmjax does not read (position_ids)
  keep `like`'s values. A "text_model." prefix on `like`'s keys is kept.
  """
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  out, used = {}, set()
  for key, ref in like.items():
    bare = key[len("text_model."):] if key.startswith("text_model.") else key
    if bare.endswith(sd_pipeline._IGNORED_KEYS):  # pylint: disable=protected-access
      out[key] = ref
      continue
    *module, leaf = sd_pipeline.our_path(bare)
    names = ("bias",) if leaf == "bias" else ("kernel", "scale", "embedding")
    path = next((tuple(module) + (n,) for n in names if tuple(module) + (n,) in flat), None)
    if path is None:
      raise CheckpointError(f"{where}: the parameters have no tensor for key {key!r}.")
    value = flat[path]
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    if value.shape != ref.shape:
      raise CheckpointError(f"{where}: key {key!r}: the parameters give shape {value.shape}, "
                            f"the source file {ref.shape}.")
    out[key] = np.ascontiguousarray(value.astype(ref.dtype))
    used.add(path)
  unused = sorted("/".join(p) for p in flat if p not in used)
  if unused:
    raise CheckpointError(f"{where}: {len(unused)} parameters have no key in the source file, "
                          f"e.g. {unused[0]!r}.")
  return out


def export_pipeline(source: str | os.PathLike, out: str | os.PathLike, params: dict,
                    overwrite: bool = False) -> str:
  """Copies the pipeline folder `source` to `out` with `params`' weights.

  Args:
    source: the diffusers pipeline folder the parameters were loaded from.
    out: the new folder (an existing one is refused unless `overwrite`).
    params: {"unet": ..., "text_encoder": ...} (an sd task's tree; "vae" is ignored:
      the VAE is copied). NumPy or JAX arrays.
    overwrite: replace an existing `out`.

  Returns:
    `out`.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  source, out = os.fspath(source), os.fspath(out)
  sd_pipeline.check_pipeline_folder(source)
  if os.path.abspath(source) == os.path.abspath(out):
    raise ValueError(f"--out={out!r} is the source folder: choose a new one.")
  if os.path.exists(out):
    if not overwrite:
      raise FileExistsError(f"{out} exists: choose a new folder, or pass overwrite=True "
                            f"(--overwrite).")
    shutil.rmtree(out)
  states = {}
  for part, stem in WEIGHTS.items():  # Everything is checked before anything is written.
    like, path = sd_pipeline._state_dict(os.path.join(source, part), stem)  # pylint: disable=protected-access
    states[part] = to_state_dict(params[part], like, path)
  shutil.copytree(source, out)
  for part, stem in WEIGHTS.items():
    folder = os.path.join(out, part)
    for name in os.listdir(folder):  # Sharded, fp16 or pickled variants: replaced by one.
      if name.startswith(stem + ".") and name != "config.json":
        os.remove(os.path.join(folder, name))
    st_numpy.save_file(states[part], os.path.join(folder, f"{stem}.safetensors"),
                       metadata={"format": "pt"})
  return out


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="An sd task run's workdir.")
  parser.add_argument("--out", required=True, help="The new pipeline folder.")
  parser.add_argument("--step", type=int, default=None, help="A checkpoint step (latest).")
  parser.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
  parser.add_argument("--lora", action="store_true",
                      help="Write only the run's LoRA adapters, as --out/" +
                      "pytorch_lora_weights.safetensors (diffusers' load_lora_weights).")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  from mmjax import runs  # pylint: disable=import-outside-toplevel
  try:
    run = runs.load_run(args.workdir, task="sd", step=args.step)
    if args.lora:
      return _export_lora(run, args.out)
    out = export_pipeline(run.field("init_from"), args.out, jax.device_get(run.merged()),
                          overwrite=args.overwrite)
  except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"sd_export: {e}", file=sys.stderr)
    return 1
  print(f"Wrote the weights of step {run.step} of {args.workdir} into {out}")
  return 0


def _export_lora(run, out: str) -> int:
  from mmjax import lora  # pylint: disable=import-outside-toplevel
  from mmjax.interop import sd_lora  # pylint: disable=import-outside-toplevel
  spec = lora.spec_from_config(run.config)
  if spec is None:
    raise ValueError(f"--lora: the run in {run.workdir} has no LoRA adapters "
                     f"(config.lora.rank is 0); export the whole pipeline without --lora.")
  path = sd_lora.save(out, run.params, spec)
  print(f"Wrote the LoRA adapters of step {run.step} of {run.workdir} to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
