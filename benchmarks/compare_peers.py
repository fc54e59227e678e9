r"""mmjax against its peers, measured by alternating the programs; one JSON line per row.

  python benchmarks/compare_peers.py                      # 3 rounds, the LeNet-5 table
  python benchmarks/compare_peers.py --rounds 5 --only lenet5:128,torch:128
  python benchmarks/compare_peers.py --table transformers --torch-python PEER_VENV/bin/python

`--table lenet` (the default): mmjax's trainer step (`train_throughput.py`) for LeNet-5
at batch 128 and 512 against the PyTorch peer (`../shared/peers/lenet_torch.py`), and
SmallCNN with mmjax.nn against plain Flax layers (`--model small_cnn_flax`).
`--table transformers`: the CLIP MNIST step (`clip_throughput.py`) at batch 128, 256
and 512 against open_clip (`../shared/peers/clip_open_clip.py`), and the latent-diffusion
U-Net + text tower step (`ldm_throughput.py --samples 0`) at batch 64, 128 and 256
against diffusers (`../shared/peers/unet_diffusers.py`), these two with the CPU split
into `--cpu-devices` devices (default 2, launch.py's `--cpu_devices`; 0: one device).
`--table all`: both.

Each round runs every row's program once, one after the other: drifts in machine load
spread over all rows alike. The peers run in their own virtual environment
(`--torch-python`; see ../shared/peers/README.md). Prints every run, then one JSON line
per row: the median examples/s (images or image-text pairs), and the ratio of mmjax's
median to its peer's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(ROOT, "..", "shared", "peers")
TABLES = {"lenet": ("lenet5", "torch", "small_cnn", "small_cnn_flax"),
          "transformers": ("clip", "open_clip", "ldm", "diffusers")}
# mmjax row -> its peer row (at the same batch).
PEER_OF = {"lenet5": "torch", "small_cnn": "small_cnn_flax", "clip": "open_clip",
           "ldm": "diffusers"}


def rows(args):
  """name -> command line."""
  mine = [sys.executable, os.path.join(HERE, "train_throughput.py"), "--repeats", "5",
          "--steps", str(args.steps)]
  cpu_devices = ["--cpu-devices", str(args.cpu_devices)] if args.cpu_devices else []
  table = {}
  for batch in (128, 512):
    table[f"lenet5:{batch}"] = mine + ["--model", "lenet5", "--batch", str(batch)]
    table[f"torch:{batch}"] = [args.torch_python, os.path.join(PEERS, "lenet_torch.py"),
                               str(args.torch_steps), str(batch)]
  for batch in (128, 512):
    table[f"small_cnn:{batch}"] = mine + ["--model", "small_cnn", "--batch", str(batch)]
    table[f"small_cnn_flax:{batch}"] = mine + ["--model", "small_cnn_flax", "--batch", str(batch)]
  for batch in (128, 256, 512):
    table[f"clip:{batch}"] = [sys.executable, os.path.join(HERE, "clip_throughput.py"),
                              "--batch", str(batch), "--steps", "10", *cpu_devices]
    table[f"open_clip:{batch}"] = [args.torch_python, os.path.join(PEERS, "clip_open_clip.py"),
                                   str(batch), "20"]
  for batch in (64, 128, 256):
    table[f"ldm:{batch}"] = [sys.executable, os.path.join(HERE, "ldm_throughput.py"),
                             "--batch", str(batch), "--steps", "10", "--samples", "0",
                             *cpu_devices]
    table[f"diffusers:{batch}"] = [args.torch_python, os.path.join(PEERS, "unet_diffusers.py"),
                                   str(batch), "20"]
  if args.only:
    return {name: table[name] for name in args.only.split(",")}
  models = sum((TABLES[t] for t in TABLES if args.table in (t, "all")), ())
  return {name: command for name, command in table.items() if name.split(":")[0] in models}


def run(command) -> dict:
  out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
  row = json.loads(out.strip().splitlines()[-1])
  row["per_sec"] = row.get("images_per_sec", row.get("pairs_per_sec"))
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=60, help="steps per repeat, mmjax")
  parser.add_argument("--torch-steps", type=int, default=300)
  parser.add_argument("--torch-python", default="/tmp/peer-venv/bin/python")
  parser.add_argument("--table", default="lenet", choices=["lenet", "transformers", "all"])
  parser.add_argument("--cpu-devices", type=int, default=2,
                      help="CLIP and U-Net rows: launch.py's --cpu_devices (0: one device)")
  parser.add_argument("--only", default="", help="comma-separated rows, e.g. lenet5:128,torch:128")
  args = parser.parse_args()
  table = rows(args)
  results = {name: [] for name in table}
  for r in range(args.rounds):
    for name, command in table.items():
      results[name].append(run(command))
      print(f"round {r + 1} {name:22s} {results[name][-1]['per_sec']:9.1f} per s", flush=True)
  runs = {name: [x["per_sec"] for x in v] for name, v in results.items()}
  median = {name: statistics.median(v) for name, v in runs.items()}
  for name, v in runs.items():
    model, batch = name.split(":")
    line = {"row": name, "median_per_sec": round(median[name], 1),
            "runs": [round(x, 1) for x in v]}
    for key in ("pipeline_images_per_sec", "pipeline_ratio", "compile_s", "achieved_gflops"):
      if key in results[name][0]:  # mmjax rows: medians of the other columns too.
        line[key] = round(statistics.median(x[key] for x in results[name]), 2)
    peer = f"{PEER_OF.get(model)}:{batch}"
    if peer in median:
      line[f"ratio_to_{peer.split(':')[0]}"] = round(median[name] / median[peer], 2)
    print(json.dumps(line))


if __name__ == "__main__":
  main()
