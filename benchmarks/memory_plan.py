r"""Parameter + optimizer bytes per device at pod scale, on paper, as JSON lines.

  python benchmarks/memory_plan.py                 # B/16, L/14 CLIP and the SD U-Net
  python benchmarks/memory_plan.py --fsdp 1 8 64 256 --min-size 1048576  # big_vision-like 4 MiB threshold

For each model, the shapes of its parameters (`jax.eval_shape` of its init: nothing is
allocated or compiled) and of AdamW's two moments (float32, `config.param_dtype`'s
default), laid out by the trainer's FSDP rule (`mmjax.train.parallel.param_spec`: each
leaf of at least `--min-size` elements split along its largest axis that the fsdp size
divides, the rest replicated). Prints the bytes one device holds for data parallelism
(fsdp=1) and each fsdp size. Activations are not counted: they depend on the batch per
device, remat and the dtype (see clip_throughput.py's `bytes_per_device`).
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CLIP = {
    "clip_B/16": dict(image=(224, 224, 3), model=dict(
        image_variant="B/16", text_width=512, text_depth=12, text_heads=8, text_mlp_dim=2048,
        max_text_len=77, embed_dim=512, text_vocab_size=49408)),
    "clip_L/14": dict(image=(224, 224, 3), model=dict(
        image_variant="L/14", text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072,
        max_text_len=77, embed_dim=768, text_vocab_size=49408)),
}
# Stable Diffusion 1.x's U-Net shapes: 64x64x4 latents, channels 320/640/1280/1280, two
# residual blocks per level, cross-attention to 77x768 text at the first three levels.
SD_UNET = dict(channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
               attention_resolutions=(1, 2, 4), num_heads=8, groups=32, context_dim=768)


def abstract_params(name: str):
  import jax
  import jax.numpy as jnp
  from mmjax import models
  rng = jax.random.PRNGKey(0)
  if name == "sd_unet":
    model = models.UNet(**SD_UNET)
    args = (jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 768)))
  else:
    spec = CLIP[name]
    model = models.CLIP(**spec["model"], openai_layout=True, activation="quick_gelu")
    args = (jnp.zeros((1, *spec["image"])), jnp.zeros((1, 77), jnp.int32))
  return jax.eval_shape(model.init, rng, *args)["params"]


def bytes_per_device(shapes, fsdp: int, min_size: int, copies: int) -> int:
  """Bytes one device holds of `copies` float32 trees shaped like `shapes`."""
  from mmjax import parallel
  total = 0
  for shape in shapes:
    split = parallel.param_spec(shape, fsdp, min_size) != parallel.P()
    total += 4 * copies * math.prod(shape) // (fsdp if split else 1)
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=[*CLIP, "sd_unet"],
                      choices=[*CLIP, "sd_unet"])
  parser.add_argument("--fsdp", nargs="+", type=int, default=[1, 8, 64, 256])
  parser.add_argument("--min-size", type=int, default=2 ** 16,
                      help="config.fsdp_min_size: smaller leaves stay replicated")
  args = parser.parse_args()

  import jax
  for name in args.models:
    shapes = [tuple(x.shape) for x in jax.tree.leaves(abstract_params(name))]
    n = sum(math.prod(s) for s in shapes)
    row = {"model": name, "params": n, "min_size": args.min_size}
    for f in args.fsdp:
      # Parameters + AdamW's first and second moments: 3 float32 copies.
      row[f"gib_per_device_fsdp{f}"] = round(
          bytes_per_device(shapes, f, args.min_size, 3) / 2 ** 30, 3)
    print(json.dumps(row))


if __name__ == "__main__":
  main()
