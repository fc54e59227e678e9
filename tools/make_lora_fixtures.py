"""Regenerates tests/fixtures/sd_tiny/sd1_lora/: a diffusers LoRA file for the sd1_ddim pipeline.

Random PEFT adapters (not zero: `init_lora_weights=False`) on the tiny SD 1.x fixture
pipeline of tools/make_sd_fixtures.py: rank 4, alpha 8 on the U-Net's attention
projections (to_q, to_k, to_v, to_out.0, Linear), its transformers' proj_in (a 1x1
Conv2d here) and its ResNets' conv1 (3x3 Conv2d), and on the text encoder's q/k/v/out
projections. Saved with `StableDiffusionPipeline.save_lora_weights` (the file
`pytorch_lora_weights.safetensors` that `load_lora_weights` reads, with its
`lora_adapter_metadata`), then loaded back into a fresh pipeline with
`load_lora_weights`; sd1_lora.npz holds that pipeline's U-Net output on sd1_ddim.npz's
inputs and its text encoder's last hidden state on sd1_ddim.npz's token ids.

With `--mmjax-python` the script then checks, from the PyTorch side, that mmjax (run
in that Python, no PyTorch there) reproduces those outputs (tests/test_sd_lora.py),
and that a file mmjax writes back (load, then save) is read by diffusers'
`load_lora_weights` with the same outputs.

Run from the repository root in an environment with torch, diffusers, transformers
and peft, after tools/make_sd_fixtures.py:

  python tools/make_lora_fixtures.py --mmjax-python .venv/bin/python
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "sd_tiny"
PIPELINE = FIXTURES / "sd1_ddim"
OUT = FIXTURES / "sd1_lora"
RANK, ALPHA = 4, 8
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_SPREAD = 0.3


def _pipeline():
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  return diffusers.StableDiffusionPipeline.from_pretrained(
      PIPELINE, torch_dtype=torch.float32, safety_checker=None)


def outputs(lora_folder: pathlib.Path) -> dict:
  """A fresh sd1_ddim pipeline with `load_lora_weights(lora_folder)`: U-Net output and
  text encoder last hidden state on sd1_ddim.npz's inputs."""
  import torch  # pylint: disable=import-outside-toplevel
  pipe = _pipeline()
  pipe.load_lora_weights(lora_folder)
  ref = np.load(FIXTURES / "sd1_ddim.npz")
  with torch.no_grad():
    unet = pipe.unet(torch.from_numpy(ref["unet_x"]), torch.from_numpy(ref["unet_t"]),
                     encoder_hidden_states=torch.from_numpy(ref["unet_context"])).sample
    text = pipe.text_encoder(torch.from_numpy(ref["text_ids"])).last_hidden_state
    # The same with the adapters fused into the weights: equal outputs, unless the
    # random weights make the model so ill-conditioned that rounding shows.
    pipe.fuse_lora()
    fused = pipe.unet(torch.from_numpy(ref["unet_x"]), torch.from_numpy(ref["unet_t"]),
                      encoder_hidden_states=torch.from_numpy(ref["unet_context"])).sample
  err = float((fused - unet).abs().max())
  if err > 1e-5:
    sys.exit(f"diffusers' fused and unfused LoRA outputs differ by {err}: lower LORA_SPREAD.")
  return {"unet_out": unet.numpy(), "text_last": text.numpy()}


def build(out: pathlib.Path) -> None:
  import diffusers  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(11)
  pipe = _pipeline()
  for model, targets in ((pipe.unet, UNET_TARGETS), (pipe.text_encoder, TEXT_TARGETS)):
    model.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                      init_lora_weights=False))
    with torch.no_grad():  # Smaller than PEFT's random init: outputs stay well-conditioned.
      for name, p in model.named_parameters():
        if "lora_" in name:
          p.mul_(LORA_SPREAD)
  metadata = lambda m: m.peft_config["default"].to_dict()
  diffusers.StableDiffusionPipeline.save_lora_weights(
      out, unet_lora_layers=peft.get_peft_model_state_dict(pipe.unet),
      text_encoder_lora_layers=peft.get_peft_model_state_dict(pipe.text_encoder),
      unet_lora_adapter_metadata=metadata(pipe.unet),
      text_encoder_lora_adapter_metadata=metadata(pipe.text_encoder), safe_serialization=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mmjax-python", help="a Python with mmjax (and no torch) to check with")
  args = parser.parse_args()
  import diffusers  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  OUT.mkdir(parents=True, exist_ok=True)
  build(OUT)
  res = outputs(OUT)
  base = np.load(FIXTURES / "sd1_ddim.npz")
  print("LoRA changes the U-Net output by", float(np.abs(res["unet_out"] - base["unet_out"]).max()),
        "and the text encoder's by", float(np.abs(res["text_last"] - base["text_last"]).max()))
  np.savez_compressed(FIXTURES / "sd1_lora.npz", **res)
  versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
              "peft": peft.__version__}
  (OUT / "manifest.json").write_text(json.dumps(
      {"versions": versions, "pipeline": PIPELINE.name, "rank": RANK, "alpha": ALPHA,
       "unet_targets": UNET_TARGETS, "text_targets": TEXT_TARGETS}, indent=1))
  print(versions, "wrote", OUT)
  if not args.mmjax_python:
    return
  check = subprocess.run([args.mmjax_python, "-m", "pytest", "-q", "-x",
                          str(REPO / "tests" / "test_sd_lora.py")], cwd=REPO)
  if check.returncode:
    sys.exit("mmjax does not reproduce diffusers' LoRA outputs: see the failures above.")
  with tempfile.TemporaryDirectory() as tmp:
    written = pathlib.Path(tmp) / "lora"
    subprocess.run([args.mmjax_python, "-c", (
        "import sys; from mmjax.interop import sd_lora; "
        "p, s = sd_lora.load_into_pipeline(sys.argv[1], sys.argv[2]); "
        "sd_lora.save(sys.argv[3], p, s)"), str(PIPELINE), str(OUT), str(written)],
                   cwd=REPO, check=True)
    again = outputs(written)
  for key, value in res.items():
    err = float(np.abs(again[key] - value).max())
    print(f"{key}: diffusers on mmjax's file vs on its own: max |diff| {err:.2e}")
    if err > 1e-5:
      sys.exit(f"diffusers reads mmjax's LoRA file with other outputs ({key}).")
  print("mmjax reads and writes diffusers' LoRA files with the same outputs.")


if __name__ == "__main__":
  main()
