r"""Generates images with a diffusers Stable Diffusion 1.x/2.x pipeline folder, in JAX.

  python -m mmjax.generate --pretrained=PIPELINE_FOLDER --prompt="a photo of a cat" \
      --negative_prompt="blurry" --num_images=4 --steps=25 --guidance=7.5 --seed=0 \
      --out=grid.png

writes the images as one PNG grid and prints where it went. The batch is split over
every device; the denoising loop compiles once; on a CPU each step prints a progress
line. `--latents=FILE.npy` starts from given latents, [num_images, h, w, 4] (NHWC),
instead of the seed's; `--scheduler=ddim|euler` replaces the folder's scheduler (with
its betas and options). A folder that is not a supported pipeline ends with one line
on stderr and exit status 1.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

_PRETRAINED = flags.DEFINE_string("pretrained", None, "A diffusers pipeline folder.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "The negative prompt.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images to generate.")
_STEPS = flags.DEFINE_integer("steps", 50, "Denoising steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (> 1: on).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial latents.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height (default: the U-Net's size).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width (default: the U-Net's size).")
_LATENTS = flags.DEFINE_string("latents", None, "A .npy of initial latents [n, h, w, c].")
_SCHEDULER = flags.DEFINE_enum("scheduler", None, ["ddim", "euler"],
                               "Replace the folder's scheduler.")
_CLIP_SKIP = flags.DEFINE_integer("clip_skip", 0, "Text encoder layers to skip at the end.")
_COLUMNS = flags.DEFINE_integer("columns", None, "Grid columns (default: about sqrt(n)).")
_OUT = flags.DEFINE_string("out", "grid.png", "Where the PNG grid goes.")
_LORA = flags.DEFINE_string("lora", None, "A diffusers LoRA file (pytorch_lora_weights."
                            "safetensors) or its folder, merged into the pipeline.")
flags.mark_flags_as_required(["pretrained", "prompt"])


def _progress(step: int, total: int) -> None:
  print(f"step {step}/{total}", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Quiet: no INFO lines from JAX and absl.
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from mmjax.interop.common import CheckpointError  # pylint: disable=import-outside-toplevel
  from mmjax.pipelines import stable_diffusion  # pylint: disable=import-outside-toplevel
  try:
    pipe = stable_diffusion.StableDiffusion.from_pretrained(_PRETRAINED.value,
                                                            _SCHEDULER.value)
    if _LORA.value:
      pipe = pipe.with_lora(_LORA.value)
    latents = None if _LATENTS.value is None else np.load(_LATENTS.value)
    n = _NUM_IMAGES.value if latents is None else len(latents)
    on_cpu = jax.default_backend() == "cpu"
    print(f"{n} images, {_STEPS.value} steps, {pipe.scheduler!r}, on "
          f"{jax.device_count()} {jax.default_backend()} device(s)", flush=True)
    images = pipe.generate([_PROMPT.value] * n, _NEGATIVE.value, num_steps=_STEPS.value,
                           guidance_scale=_GUIDANCE.value, seed=_SEED.value, latents=latents,
                           height=_HEIGHT.value, width=_WIDTH.value,
                           clip_skip=_CLIP_SKIP.value,
                           progress=_progress if on_cpu else None)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"generate: {e}", file=sys.stderr)
    sys.exit(1)
  out = os.path.abspath(_OUT.value)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  Image.fromarray(stable_diffusion.grid(stable_diffusion.to_uint8(images), _COLUMNS.value)).save(
      out)
  print(f"Wrote {n} images ({images.shape[2]}x{images.shape[1]}) to {out}")


if __name__ == "__main__":
  app.run(main)
