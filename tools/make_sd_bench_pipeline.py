"""Writes a random Stable Diffusion 1.x-layout pipeline of small but not toy sizes, for
benchmarks/sd_generate.py (jax against diffusers on the same folder).

U-Net: block channels (64, 128, 256), two ResNet layers per block, cross-attention on
the first two levels to a 256-wide text encoder of 4 layers, 32x32 latents; VAE: two
levels of (32, 64) channels, so 64x64 images; DDIM as SD 1.5 has it. About 16 M U-Net
parameters: a step is real work on either side, unlike the test fixtures'.

Run in an environment with torch, diffusers and transformers:

  python tools/make_sd_bench_pipeline.py --out /tmp/sd_bench
"""
import argparse
import pathlib

import make_sd_fixtures as fixtures

SD1 = fixtures.PIPELINES["sd1_ddim"]  # The layout, tokenizer and scheduler; larger sizes.
SPEC = dict(SD1, unet=dict(SD1["unet"], sample_size=32, block_out_channels=(64, 128, 256),
                           layers_per_block=2, cross_attention_dim=256, attention_head_dim=8,
                           norm_num_groups=32),
            text=dict(SD1["text"], hidden_size=256, intermediate_size=1024, num_hidden_layers=4))
VAE = dict(fixtures.VAE, block_out_channels=[32, 64], norm_num_groups=32, sample_size=64)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="The pipeline folder to write.")
  out = pathlib.Path(parser.parse_args().out)
  fixtures.build(out.name, SPEC, out.parent, vae=VAE)
  print(f"Wrote {out}")


if __name__ == "__main__":
  main()
