r"""Image-caption pairs of one's own -> a TFDS dataset (ArrayRecord) that CLIP trains on.

  python -m mmjax.data.make_dataset --input=DIR --output_dir=DATA_DIR --name=my_pairs
  python -m mmjax.data.make_dataset --input='shards/*.tar' --output_dir=DATA_DIR --name=my_pairs

Inputs:
  - a folder with `captions.tsv` (`<image path relative to the folder><TAB><caption>` per
    line; a first line `file<TAB>caption` or `image<TAB>caption` is a header) or
    `captions.jsonl` (`{"image": path, "caption": text}` per line; "file_name"/"text"
    are accepted too);
  - WebDataset tar shards as img2dataset writes them: `<key>.jpg|.jpeg|.png|.webp` with
    `<key>.txt` (other members, `.json` and the like, are ignored): a folder of `.tar`
    files, a glob, or a comma-separated list.

Output: TFDS's own writer (`tfds.dataset_builders.store_as_tfds_dataset`, ArrayRecord)
into `<output_dir>/<name>/1.0.0/`, readable with `tfds.data_source(name,
data_dir=output_dir)` and by mmjax's pipeline (`--config.dataset.name=<name>
--config.dataset.data_dir=<output_dir>`). Features: "image" uint8 [size, size, 3] (the
shorter side resized to `--image_size`, the centre square kept; the training pipeline
crops again at random), "caption" text, "key" (the source file or tar key). Splits:
"train" and "validation", each pair placed by a hash of its key (`--val_fraction` of
them in validation, the same pairs whatever the order or number of shards).

Pairs that cannot be used are skipped, not fatal: an image that is missing or does
not decode, an empty caption, an image without a caption or a caption without an image
in a shard. The counts, with up to 10 keys per reason, are printed and written to
`<output_dir>/<name>/conversion_report.json`. Writing needs TensorFlow (TFDS encodes
the images with it); reading does not. The resized images are held in memory while
converting: about n * size**2 * 3 bytes.
"""
import argparse
import collections
import glob
import hashlib
import importlib.util
import io
import json
import os
import re
import tarfile

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
VERSION = "1.0.0"
_SHOWN = 10  # Keys kept per skip reason in the report.


class Skipped:
  """Counts of skipped pairs per reason, with the first few keys of each."""

  def __init__(self):
    self.counts = collections.Counter()
    self.keys = collections.defaultdict(list)

  def add(self, reason: str, key: str):
    self.counts[reason] += 1
    if len(self.keys[reason]) < _SHOWN:
      self.keys[reason].append(key)

  def report(self) -> dict:
    return {reason: {"count": n, "keys": self.keys[reason]} for reason, n in
            sorted(self.counts.items())}


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3]: RGB, shorter side resized to `size`,
  the centre square kept. Raises on anything PIL cannot decode."""
  import PIL.Image  # pylint: disable=import-outside-toplevel
  with PIL.Image.open(io.BytesIO(data)) as image:
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), PIL.Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def _folder_pairs(folder: str):
  """Yields (key, image bytes or None, caption) from a folder's captions file."""
  tsv, jsonl = os.path.join(folder, "captions.tsv"), os.path.join(folder, "captions.jsonl")
  rows = []
  if os.path.exists(tsv):
    with open(tsv, encoding="utf-8") as f:
      for n, line in enumerate(f):
        line = line.rstrip("\n")
        if not line.strip():
          continue
        name, _, caption = line.partition("\t")
        if n == 0 and name.strip().lower() in ("file", "image", "filename", "file_name") \
            and caption.strip().lower() in ("caption", "text"):
          continue
        rows.append((name.strip(), caption))
  elif os.path.exists(jsonl):
    with open(jsonl, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          rows.append((str(row.get("image", row.get("file_name", ""))),
                       str(row.get("caption", row.get("text", "")) or "")))
  else:
    raise FileNotFoundError(f"{folder} has neither captions.tsv nor captions.jsonl: write "
                            f"one line per image, '<path><TAB><caption>' or "
                            f'{{"image": path, "caption": text}}.')
  for name, caption in rows:
    path = os.path.join(folder, name)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      data = None
    yield name, data, caption


def _shard_paths(spec: str) -> list[str]:
  if os.path.isdir(spec):
    return sorted(glob.glob(os.path.join(spec, "*.tar")))
  paths = []
  for part in filter(None, spec.split(",")):
    paths.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
  return paths


def _shard_pairs(paths: list[str], skipped: Skipped):
  """Yields (key, image bytes, caption) from WebDataset shards; unpaired members skipped."""
  for path in paths:
    members = collections.defaultdict(dict)
    with tarfile.open(path) as tar:
      for info in tar:
        if not info.isfile():
          continue
        directory, base = os.path.split(info.name)
        stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot.
        ext = "." + ext.lower() if dot else ""
        if ext in IMAGE_EXTENSIONS or ext == ".txt":
          members[os.path.join(directory, stem)][ext] = tar.extractfile(info).read()
    for key, parts in members.items():
      image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
      full = f"{os.path.basename(path)}:{key}"
      if image is None:
        skipped.add("caption without an image", full)
      elif ".txt" not in parts:
        skipped.add("image without a caption", full)
      else:
        yield full, image, parts[".txt"].decode("utf-8", "replace")


def in_validation(key: str, val_fraction: float) -> bool:
  """Whether the pair `key` goes to the validation split: a hash of the key, not its order."""
  h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
  return h / 2**64 < val_fraction


def convert(inputs: str, output_dir: str, name: str, *, val_fraction: float = 0.1,
            image_size: int = 64) -> dict:
  """Converts a folder or WebDataset shards (see the module docstring); returns the report
  {"name", "data_dir", "splits": {split: n}, "skipped": {reason: {count, keys}}}."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"--name={name!r}: TFDS names are lower case letters, digits and "
                     f"underscores, starting with a letter (e.g. 'my_pairs').")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"--val_fraction={val_fraction}: must be in (0, 1).")
  if importlib.util.find_spec("tensorflow") is None:  # TFDS encodes the images with it.
    raise ModuleNotFoundError("Writing a TFDS dataset needs TensorFlow: "
                              "pip install 'mmjax[prepare]'.")
  target = os.path.join(output_dir, name, VERSION)
  if os.path.exists(os.path.join(target, "dataset_info.json")):
    raise FileExistsError(f"{target} already holds a prepared dataset: choose another "
                          f"--name or --output_dir, or remove it.")
  skipped = Skipped()
  if os.path.isdir(inputs) and any(os.path.exists(os.path.join(inputs, f))
                                   for f in ("captions.tsv", "captions.jsonl")):
    pairs = _folder_pairs(inputs)
  else:
    shards = _shard_paths(inputs)
    if not shards or not all(os.path.isfile(p) for p in shards):
      raise FileNotFoundError(f"--input={inputs!r}: neither a folder with captions.tsv / "
                              f"captions.jsonl nor existing .tar shards (a folder of them, "
                              f"a glob or a comma-separated list).")
    pairs = _shard_pairs(shards, skipped)

  splits = {"train": [], "validation": []}
  for key, data, caption in pairs:
    caption = " ".join(caption.split())
    if data is None:
      skipped.add("image file missing", key)
      continue
    if not caption:
      skipped.add("empty caption", key)
      continue
    try:
      image = decode_image(data, image_size)
    except Exception:  # pylint: disable=broad-except  # PIL raises many kinds.
      skipped.add("unreadable image", key)
      continue
    split = "validation" if in_validation(key, val_fraction) else "train"
    splits[split].append((key, {"image": image, "caption": caption, "key": key}))
  empty = [s for s, examples in splits.items() if not examples]
  if empty:
    raise ValueError(f"No usable pairs for the {' and '.join(empty)} split(s) "
                     f"({sum(map(len, splits.values()))} usable, skipped: "
                     f"{dict(skipped.counts)}); give more pairs or change --val_fraction.")

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(image_size, image_size, 3)),
      "caption": tfds.features.Text(),
      "key": tfds.features.Text(),
  })
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=VERSION, features=features, split_datasets=splits,
      data_dir=output_dir, file_format="array_record",
      description=f"Image-caption pairs converted from {inputs} by mmjax.data.make_dataset.")
  report = {"name": name, "data_dir": output_dir,
            "splits": {s: len(v) for s, v in splits.items()}, "skipped": skipped.report()}
  with open(os.path.join(output_dir, name, "conversion_report.json"), "w",
            encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Image-caption pairs (a folder with captions.tsv/.jsonl, or WebDataset "
                  "tar shards) -> a TFDS ArrayRecord dataset with train/validation splits.")
  parser.add_argument("--input", required=True,
                      help="A folder with captions.tsv or captions.jsonl, or .tar shards "
                           "(a folder of them, a glob, or a comma-separated list).")
  parser.add_argument("--output_dir", required=True, help="The TFDS data directory to write.")
  parser.add_argument("--name", required=True, help="The dataset's name (snake_case).")
  parser.add_argument("--val_fraction", type=float, default=0.1)
  parser.add_argument("--image_size", type=int, default=64,
                      help="Side of the stored square images, in pixels.")
  args = parser.parse_args(argv)
  report = convert(args.input, args.output_dir, args.name, val_fraction=args.val_fraction,
                   image_size=args.image_size)
  skipped = report["skipped"]
  print(f"Wrote {args.name} to {os.path.join(args.output_dir, args.name, VERSION)}: "
        + ", ".join(f"{s} {n}" for s, n in report["splits"].items()) + " pairs.")
  if skipped:
    print(f"Skipped {sum(r['count'] for r in skipped.values())} pair(s): " + "; ".join(
        f"{reason}: {r['count']} (e.g. {', '.join(r['keys'][:3])})"
        for reason, r in skipped.items()))
  else:
    print("Skipped nothing.")
  print(f"Report: {os.path.join(args.output_dir, args.name, 'conversion_report.json')}")


if __name__ == "__main__":
  main()
