r"""Generates a captioned image set: one coloured shape per image, described by its caption.

  python tools/make_shapes.py --output=data/shapes --num=4000 --size=64
  python tools/make_shapes.py --output=data/shapes_wds --num=4000 --format=webdataset --shards=4

"a large red circle at the top left": 6 colours x 3 shapes x 2 sizes x 9 places = 324
distinct captions, on a grey background with a little pixel noise. Written as what
mmjax.data.make_dataset reads: a folder of PNGs with `captions.tsv` (`file<TAB>caption`
per line), or WebDataset tar shards (`<key>.png` + `<key>.txt`, as img2dataset writes
them). The same seed gives the same images.
"""
import argparse
import io
import os
import tarfile

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.38}  # Shape width, as a fraction of the image.
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")


def make_example(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
  """One uint8 image [size, size, 3] and its caption."""
  import PIL.Image  # pylint: disable=import-outside-toplevel
  import PIL.ImageDraw  # pylint: disable=import-outside-toplevel
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  scale = list(SIZES)[rng.integers(len(SIZES))]
  row, col = rng.integers(3), rng.integers(3)
  width = SIZES[scale] * size
  # The cell's centre, jittered by up to a tenth of the image.
  cx = (col + 0.5) * size / 3 + rng.uniform(-0.1, 0.1) * size / 3
  cy = (row + 0.5) * size / 3 + rng.uniform(-0.1, 0.1) * size / 3
  background = np.full((size, size, 3), 128, np.float32) + rng.normal(0, 8, (size, size, 3))
  image = PIL.Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
  draw = PIL.ImageDraw.Draw(image)
  box = (cx - width / 2, cy - width / 2, cx + width / 2, cy + width / 2)
  fill = COLOURS[colour]
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
  place = "centre" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"
  return np.asarray(image), f"a {scale} {colour} {shape} at the {place}"


def _png(image: np.ndarray) -> bytes:
  import PIL.Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def write(output: str, num: int, size: int = 64, fmt: str = "folder", shards: int = 1,
          seed: int = 0) -> list[str]:
  """Writes `num` examples under `output`; returns the files written (captions.tsv or
  the shards)."""
  if fmt not in ("folder", "webdataset"):
    raise ValueError(f"format={fmt!r}: use 'folder' or 'webdataset'.")
  os.makedirs(output, exist_ok=True)
  rng = np.random.default_rng(seed)
  examples = [make_example(rng, size) for _ in range(num)]
  if fmt == "folder":
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(examples):
      name = f"images/{i:06d}.png"
      with open(os.path.join(output, name), "wb") as f:
        f.write(_png(image))
      lines.append(f"{name}\t{caption}\n")
    path = os.path.join(output, "captions.tsv")
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(lines)
    return [path]
  paths = []
  for s, part in enumerate(np.array_split(np.arange(num), shards)):
    path = os.path.join(output, f"{s:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in part.tolist():
        image, caption = examples[i]
        for ext, data in (("png", _png(image)), ("txt", caption.encode("utf-8"))):
          info = tarfile.TarInfo(f"{s:05d}{i:06d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True, help="Directory to write into.")
  parser.add_argument("--num", type=int, default=4000, help="Number of image-caption pairs.")
  parser.add_argument("--size", type=int, default=64, help="Image side in pixels.")
  parser.add_argument("--format", default="folder", choices=("folder", "webdataset"))
  parser.add_argument("--shards", type=int, default=4, help="Tar shards (webdataset).")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  paths = write(args.output, args.num, args.size, args.format, args.shards, args.seed)
  print(f"Wrote {args.num} pairs: {', '.join(paths)}")


if __name__ == "__main__":
  main()
