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

Captions files are UTF-8 (a byte-order mark is dropped; one of UTF-16 or UTF-32
decodes the file in that encoding); `captions.jsonl` may also hold one JSON array of
such objects. Image paths are relative to the folder: absolute paths, and paths or
symbolic links that lead outside the folder, are refused, as tar extraction filters do.
Images are turned upright by their EXIF orientation; 16-bit greyscale (PIL modes
"I;16" and "I") is scaled to 8 bits.

Whatever cannot be used is skipped, not fatal, and each skipped item is printed on a
line of its own with its reason: a captions line that is not UTF-8, not JSON or not an
object, a path outside the folder, an image that is missing or does not decode, an
empty caption, an image without a caption or a caption without an image in a shard, a
shard that does not read. An image listed twice keeps both captions (keys
"<path>#2", ...; both in the same split). The counts, with up to 10 keys per reason,
are written to `<output_dir>/<name>/conversion_report.json`, the files' sizes and the
metadata's SHA-256 to `<output_dir>/<name>/1.0.0/mmjax_files.json` (checked whenever
mmjax reads the dataset, `sources.check_prepared`). An existing dataset
`<name>` is refused, or replaced with `--overwrite` once the new one is complete.
Writing needs TensorFlow (TFDS encodes the images with it); reading does not. The
resized images are held in memory while converting: about n * size**2 * 3 bytes.
"""
import argparse
import codecs
import collections
import glob
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile

import numpy as np

from mmjax.data import sources

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
VERSION = "1.0.0"
_SHOWN = 10  # Keys kept per skip reason in the report.
# PIL modes of greyscale wider than 8 bits (16-bit PNG and TIFF): 0..65535.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Byte-order marks of other encodings than UTF-8 (whose mark is dropped, each line then
# decoded alone); UTF-32's before UTF-16's, whose marks begin them.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"),
         (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


class Skipped:
  """Counts of skipped items per reason, with the first few keys of each; `on_skip(key,
  reason)` is called for every one."""

  def __init__(self, on_skip=None):
    self.counts = collections.Counter()
    self.keys = collections.defaultdict(list)
    self.on_skip = on_skip

  def add(self, reason: str, key: str, detail: str = ""):
    self.counts[reason] += 1
    if len(self.keys[reason]) < _SHOWN:
      self.keys[reason].append(key)
    if self.on_skip is not None:
      self.on_skip(key, f"{reason} ({detail})" if detail else reason)

  def report(self) -> dict:
    return {reason: {"count": n, "keys": self.keys[reason]} for reason, n in
            sorted(self.counts.items())}


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3]: RGB, upright (EXIF orientation),
  shorter side resized to `size`, the centre square kept; 16-bit greyscale scaled to
  8 bits. Raises on anything PIL cannot decode."""
  import PIL.Image  # pylint: disable=import-outside-toplevel
  import PIL.ImageOps  # pylint: disable=import-outside-toplevel
  with PIL.Image.open(io.BytesIO(data)) as image:
    image = PIL.ImageOps.exif_transpose(image)  # Upright, as viewers show it.
    if image.mode in _WIDE_GREY:  # PIL's convert would clip 16-bit values at 255.
      wide = np.asarray(image, np.float64)
      image = PIL.Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), PIL.Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def _lines(path: str, skipped: Skipped):
  """Yields (line number, text) of a captions file; lines that are not UTF-8 are skipped."""
  with open(path, "rb") as f:
    data = f.read()
  base = os.path.basename(path)
  data = data.removeprefix(codecs.BOM_UTF8)
  for bom, encoding in _BOMS:
    if data.startswith(bom):
      try:
        text = data[len(bom):].decode(encoding)
      except UnicodeDecodeError as e:
        raise ValueError(f"{path} begins with a {encoding} byte-order mark but does not "
                         f"decode as {encoding} ({e}): save it as UTF-8.") from None
      for n, line in enumerate(text.split("\n"), 1):
        yield n, line.rstrip("\r")
      return
  for n, raw in enumerate(data.split(b"\n"), 1):
    try:
      yield n, raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      skipped.add("captions line not UTF-8", f"{base} line {n}",
                  f"{e.reason} at byte {e.start}; save the file as UTF-8")


def _json_rows(path: str, skipped: Skipped):
  """Yields (where, image path, caption) from captions.jsonl (or one JSON array)."""
  base = os.path.basename(path)
  lines = [(n, line) for n, line in _lines(path, skipped) if line.strip()]
  try:  # The whole file as one JSON value: an array of objects (or a single object).
    whole = json.loads("\n".join(line for _, line in lines))
    items = [(f"{base} item {i + 1}", v) for i, v in enumerate(whole)] \
        if isinstance(whole, list) else [(f"{base} line {lines[0][0]}", whole)]
  except ValueError:
    items = []
    for n, line in lines:
      try:
        value = json.loads(line)
      except ValueError as e:
        skipped.add("captions line not JSON", f"{base} line {n}", str(e))
        continue
      if isinstance(value, list):  # A line holding an array of objects.
        items.extend((f"{base} line {n} item {i + 1}", v) for i, v in enumerate(value))
      else:
        items.append((f"{base} line {n}", value))
  for where, row in items:
    if not isinstance(row, dict):
      skipped.add("captions entry not a JSON object", where,
                  'write {"image": path, "caption": text}')
      continue
    image = row.get("image", row.get("file_name"))
    caption = row.get("caption", row.get("text"))
    if not isinstance(image, str) or not image:
      skipped.add("captions entry without an image path", where,
                  f'"image" must be a path, not {image!r}'[:200])
    elif caption is not None and not isinstance(caption, str):
      skipped.add("caption not text", where, f"{caption!r}"[:200])
    else:
      yield where, image, caption or ""


def _tsv_rows(path: str, skipped: Skipped):
  """Yields (where, image path, caption) from captions.tsv (a header line is skipped)."""
  base = os.path.basename(path)
  for n, line in _lines(path, skipped):
    if not line.strip():
      continue
    name, _, caption = line.partition("\t")
    if n == 1 and name.strip().lower() in ("file", "image", "filename", "file_name") \
        and caption.strip().lower() in ("caption", "text"):
      continue
    yield f"{base} line {n}", name.strip(), caption


def resolve_inside(folder: str, name: str) -> str:
  """The real path of `name` (relative to `folder`); ValueError if it is absolute, holds
  a NUL, or leads outside the folder (through "..", or a symbolic link)."""
  if "\x00" in name:
    raise ValueError("a NUL character in the path")
  if os.path.isabs(name) or re.match(r"[A-Za-z]:[\\/]|[\\/]", name):
    raise ValueError("an absolute path; paths are relative to the input folder")
  root = os.path.realpath(folder)
  path = os.path.realpath(os.path.join(root, name))
  if os.path.commonpath([root, path]) != root:
    raise ValueError(f"leads outside the input folder (to {path})")
  return path


def _folder_pairs(folder: str, skipped: Skipped):
  """Yields (key, image bytes or None, caption) from a folder's captions file."""
  tsv, jsonl = os.path.join(folder, "captions.tsv"), os.path.join(folder, "captions.jsonl")
  if os.path.exists(tsv):
    rows = _tsv_rows(tsv, skipped)
  elif os.path.exists(jsonl):
    rows = _json_rows(jsonl, skipped)
  else:
    raise FileNotFoundError(f"{folder} has neither captions.tsv nor captions.jsonl: write "
                            f"one line per image, '<path><TAB><caption>' or "
                            f'{{"image": path, "caption": text}}.')
  for where, name, caption in rows:
    try:
      path = resolve_inside(folder, name)
    except ValueError as e:
      skipped.add("image path refused", f"{where}: {name!r}"[:300], str(e))
      continue
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
  return list(dict.fromkeys(paths))  # A shard named twice is read once.


def _shard_pairs(paths: list[str], skipped: Skipped):
  """Yields (key, image bytes, caption) from WebDataset shards; unpaired members skipped."""
  for path in paths:
    members = collections.defaultdict(dict)
    try:  # Members are read into memory, never extracted: their names touch no file.
      with tarfile.open(path) as tar:
        for info in tar:
          if not info.isfile():
            continue
          directory, base = os.path.split(info.name)
          stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot.
          ext = "." + ext.lower() if dot else ""
          if ext in IMAGE_EXTENSIONS or ext == ".txt":
            members[os.path.join(directory, stem)][ext] = tar.extractfile(info).read()
        # tarfile stops without a word at a torn or damaged header: an archive ends
        # with a zero block (its end-of-archive marker), else members were lost.
        tar.fileobj.seek(tar.offset)
        end = tar.fileobj.read(tarfile.BLOCKSIZE)
        if len(end) < tarfile.BLOCKSIZE or any(end):
          raise tarfile.ReadError(f"cut short or damaged at byte {tar.offset}; the members "
                                  "before it are used")
    except (tarfile.TarError, OSError, EOFError) as e:  # Its complete members still count.
      skipped.add("unreadable tar shard", path, str(e) or type(e).__name__)
    for key, parts in members.items():
      image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
      full = f"{os.path.basename(path)}:{key}"
      if image is None:
        skipped.add("caption without an image", full)
      elif ".txt" not in parts:
        skipped.add("image without a caption", full)
      else:
        try:
          caption = parts[".txt"].decode("utf-8-sig")
        except UnicodeDecodeError as e:
          skipped.add("caption not UTF-8", full, f"{e.reason} at byte {e.start}")
          continue
        yield full, image, caption


def in_validation(key: str, val_fraction: float) -> bool:
  """Whether the pair `key` goes to the validation split: a hash of the key, not its order."""
  h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
  return h / 2**64 < val_fraction


def convert(inputs: str, output_dir: str, name: str, *, val_fraction: float = 0.1,
            image_size: int = 64, overwrite: bool = False, on_skip=None) -> dict:
  """Converts a folder or WebDataset shards (see the module docstring); returns the report
  {"name", "data_dir", "splits": {split: n}, "skipped": {reason: {count, keys}}}.

  `on_skip(key, reason)` is called for every item skipped. With `overwrite`, an existing
  `<output_dir>/<name>` is replaced once the new dataset is complete; without it, it is
  refused (FileExistsError) before anything is read.
  """
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"--name={name!r}: TFDS names are lower case letters, digits and "
                     f"underscores, starting with a letter (e.g. 'my_pairs').")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"--val_fraction={val_fraction}: must be in (0, 1).")
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"--image_size={image_size}: must be an integer >= 1.")
  final = os.path.join(output_dir, name)
  if os.path.lexists(final) and not overwrite:
    if os.path.exists(os.path.join(final, VERSION, "dataset_info.json")):
      raise FileExistsError(f"{os.path.join(final, VERSION)} already holds a prepared "
                            f"dataset: add --overwrite to replace it (once the new one is "
                            f"complete), or choose another --name or --output_dir.")
    raise FileExistsError(f"{final} exists but holds no prepared dataset: remove it, or add "
                          f"--overwrite to replace it.")
  if importlib.util.find_spec("tensorflow") is None:  # TFDS encodes the images with it.
    raise ModuleNotFoundError("Writing a TFDS dataset needs TensorFlow: "
                              "pip install 'mmjax[prepare]'.")
  skipped = Skipped(on_skip)
  if os.path.isdir(inputs) and any(os.path.exists(os.path.join(inputs, f))
                                   for f in ("captions.tsv", "captions.jsonl")):
    pairs = _folder_pairs(inputs, skipped)
  else:
    shards = _shard_paths(inputs)
    if not shards or not all(os.path.isfile(p) for p in shards):
      raise FileNotFoundError(f"--input={inputs!r}: neither a folder with captions.tsv / "
                              f"captions.jsonl nor existing .tar shards (a folder of them, "
                              f"a glob or a comma-separated list).")
    pairs = _shard_pairs(shards, skipped)

  splits = {"train": [], "validation": []}
  seen = collections.Counter()
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
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds.
      skipped.add("unreadable image", key, str(e)[:200])
      continue
    split = "validation" if in_validation(key, val_fraction) else "train"
    seen[key] += 1  # An image with several captions: one example each, in one split.
    unique = key if seen[key] == 1 else f"{key}#{seen[key]}"
    splits[split].append((unique, {"image": image, "caption": caption, "key": unique}))
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
  report = {"name": name, "data_dir": output_dir,
            "splits": {s: len(v) for s, v in splits.items()}, "skipped": skipped.report()}
  os.makedirs(output_dir, exist_ok=True)
  # Written beside the destination, moved into place once complete: an interrupted or
  # failed conversion leaves the previous dataset (if any) as it was.
  staging = tempfile.mkdtemp(prefix=f".{name}.converting-", dir=output_dir)
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=VERSION, features=features, split_datasets=splits,
        data_dir=staging, file_format="array_record",
        description=f"Image-caption pairs converted from {inputs} by mmjax.data.make_dataset.")
    with open(os.path.join(staging, name, "conversion_report.json"), "w",
              encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    # The files' sizes and the metadata's SHA-256, checked whenever mmjax reads them.
    sources.write_manifest(os.path.join(staging, name, VERSION))
    if os.path.lexists(final):
      os.rename(final, os.path.join(staging, "previous"))
    os.rename(os.path.join(staging, name), final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
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
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace an existing dataset of this name (once the new one is "
                           "complete).")
  args = parser.parse_args(argv)

  def on_skip(key, reason):
    print(f"skipped {key}: {reason}", flush=True)

  try:
    report = convert(args.input, args.output_dir, args.name, val_fraction=args.val_fraction,
                     image_size=args.image_size, overwrite=args.overwrite, on_skip=on_skip)
  except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError, a full disk...
    if os.environ.get("MMJAX_TRACEBACK", "") not in ("", "0"):
      raise
    sys.stdout.flush()
    sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
    sys.exit(1)
  skipped = report["skipped"]
  print(f"Wrote {args.name} to {os.path.join(args.output_dir, args.name, VERSION)}: "
        + ", ".join(f"{s} {n}" for s, n in report["splits"].items()) + " pairs.")
  if skipped:
    print(f"Skipped {sum(r['count'] for r in skipped.values())} item(s): " + "; ".join(
        f"{reason}: {r['count']}" for reason, r in skipped.items()))
  else:
    print("Skipped nothing.")
  print(f"Report: {os.path.join(args.output_dir, args.name, 'conversion_report.json')}")


if __name__ == "__main__":
  main()
