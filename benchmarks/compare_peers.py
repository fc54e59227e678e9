r"""The LeNet-5 / SmallCNN comparison table, measured by alternating the programs.

  python benchmarks/compare_peers.py                      # 3 rounds, the whole table
  python benchmarks/compare_peers.py --rounds 5 --only lenet5:128,torch:128

Each round runs, one after the other, every row's program once: mmjax's trainer step
(`train_throughput.py`) for LeNet-5 at batch 128 and 512, the PyTorch peer
(`../shared/peers/lenet_torch.py`, in its own virtual environment) at the same
batches, and SmallCNN with mmjax.nn and with plain Flax layers (`--model
small_cnn_flax`, the same trainer step) at batch 128 and 512. Alternating spreads
drifts in machine load over all rows alike. Prints every run, then one JSON line per
row with the median images/s, and the ratios mmjax / PyTorch and mmjax / plain Flax.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(ROOT, "..", "shared", "peers", "lenet_torch.py")


def rows(args):
  """name -> command line."""
  mine = [sys.executable, os.path.join(HERE, "train_throughput.py"), "--repeats", "5",
          "--steps", str(args.steps)]
  table = {}
  for batch in (128, 512):
    table[f"lenet5:{batch}"] = mine + ["--model", "lenet5", "--batch", str(batch)]
    table[f"torch:{batch}"] = [args.torch_python, PEER, str(args.torch_steps), str(batch)]
  for batch in (128, 512):
    table[f"small_cnn:{batch}"] = mine + ["--model", "small_cnn", "--batch", str(batch)]
    table[f"small_cnn_flax:{batch}"] = mine + ["--model", "small_cnn_flax", "--batch", str(batch)]
  if args.only:
    table = {name: table[name] for name in args.only.split(",")}
  return table


def run(command) -> dict:
  out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=60, help="steps per repeat, mmjax")
  parser.add_argument("--torch-steps", type=int, default=300)
  parser.add_argument("--torch-python", default="/tmp/peer-venv/bin/python")
  parser.add_argument("--only", default="", help="comma-separated rows, e.g. lenet5:128,torch:128")
  args = parser.parse_args()
  table = rows(args)
  results = {name: [] for name in table}
  for r in range(args.rounds):
    for name, command in table.items():
      results[name].append(run(command))
      print(f"round {r + 1} {name:22s} {results[name][-1]['images_per_sec']:9.1f} images/s",
            flush=True)
  runs = {name: [x["images_per_sec"] for x in v] for name, v in results.items()}
  median = {name: statistics.median(v) for name, v in runs.items()}
  for name, v in runs.items():
    model, batch = name.split(":")
    line = {"row": name, "median_images_per_sec": round(median[name], 1),
            "runs": [round(x, 1) for x in v]}
    for key in ("pipeline_images_per_sec", "pipeline_ratio", "compile_s", "achieved_gflops"):
      if key in results[name][0]:  # mmjax rows: medians of the other columns too.
        line[key] = round(statistics.median(x[key] for x in results[name]), 2)
    peer = {"lenet5": f"torch:{batch}", "small_cnn": f"small_cnn_flax:{batch}"}.get(model)
    if peer in median:
      line[f"ratio_to_{peer.split(':')[0]}"] = round(median[name] / median[peer], 2)
    print(json.dumps(line))


if __name__ == "__main__":
  main()
