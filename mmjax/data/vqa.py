"""Visual questions and captions about 2x2 grids of classification images (MNIST, Fashion-MNIST).

Each example is a 56x56 image made of four 28x28 images, in reading order: top left,
top right, bottom left, bottom right. About a grid one may ask

- *cell*: "what is in the top left?" -> "seven";
- *count*: "how many sevens are there?" -> "two";
- *presence*: "is there a seven?" -> "yes" / "no";

or caption it, "a seven, a two, a nine and a one", for image-text matching, with
mismatched captions as negatives.

Everything is a deterministic function of a seed and an integer key (a training
example's stream position, an evaluation grid's index), through a counter-based hash:
a resumed run sees exactly the grids, questions and negatives it would have seen.
Training grids are drawn from the training split only, evaluation grids from the test
split only; the question templates of evaluation (`EVAL_TEMPLATES`) are phrasings never
seen in training.
"""
import numpy as np

from mmjax.data import seeded
from mmjax.data import tokenizer as tokenizer_lib

GRID = 2  # Cells per side.
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
KINDS = ("cell", "count", "presence")

# A question is a core phrase, an optional suffix and "?". Training uses most
# (core, suffix) pairs; evaluation the held-out pairs, one per core: every word of an
# evaluation question is seen in training, never in that phrasing.
# Core fields: {cell}, {name}, {a_name} ("a seven", "an eight"), {plural} ("sevens").
CORES = {
    "cell": ("what is in the {cell}", "what is shown in the {cell}",
             "what do you see in the {cell}", "which one is in the {cell}",
             "name the thing in the {cell}", "tell me what is in the {cell}"),
    "count": ("how many {plural} are there", "how many {plural} do you see",
              "count the {plural}", "how many {plural} are shown",
              "what is the number of {plural}", "how many {plural} can you count"),
    "presence": ("is there {a_name}", "do you see {a_name}", "can you find {a_name}",
                 "does it show {a_name}", "do you spot {a_name}", "can you see {a_name}"),
}
SUFFIXES = ("", " here", " at all", " in view")


def _templates(held_out: bool) -> dict[str, tuple[str, ...]]:
  out = {}
  for kind, cores in CORES.items():
    out[kind] = tuple(core + suffix + "?" for i, core in enumerate(cores)
                      for j, suffix in enumerate(SUFFIXES)
                      if (j == (i + 1) % len(SUFFIXES)) == held_out)
  return out


TRAIN_TEMPLATES = _templates(held_out=False)  # 18 per kind.
EVAL_TEMPLATES = _templates(held_out=True)  # 6 per kind, none of them seen in training.

# Hash streams: independent draws from one (seed, key).
_CELL_STREAMS = (0, 1, 2, 3)
_SLOT, _KIND, _TEMPLATE, _WHICH_CELL, _COIN, _CLASS, _MATCH, _HARD, _NEGATIVE = range(4, 13)
_NEGATIVE_CELLS = (13, 14, 15, 16)
_MLM = 17


def draw(keys: np.ndarray, n: int, seed: int, stream: int) -> np.ndarray:
  """[batch] int keys -> [batch] ints in [0, n): a reproducible hash of (seed, stream, key)."""
  with np.errstate(over="ignore"):  # The hash multiplies modulo 2**64 on purpose.
    return seeded.choice(np.asarray(keys), n, seed * 1_000_003 + stream)


def uniform(keys: np.ndarray, seed: int, stream: int) -> np.ndarray:
  """[batch] int keys -> [batch] floats in [0, 1), reproducible like `draw`."""
  return draw(keys, 2**24, seed, stream) / 2**24


def article(name: str) -> str:
  """"seven" -> "a seven", "eight" -> "an eight" ("one" keeps "a")."""
  return ("an " if name[0] in "aeiou" and not name.startswith("one") else "a ") + name


def plural(name: str) -> str:
  """"seven" -> "sevens", "six" -> "sixes", "dress" -> "dresses"."""
  return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def caption(names: list[str]) -> str:
  """Four class names in reading order -> "a seven, a two, a nine and a one"."""
  items = [article(n) for n in names]
  return ", ".join(items[:-1]) + " and " + items[-1]


def grid_shape(cell_shape) -> tuple[int, int, int]:
  """[h, w, c] of a cell -> [2h, 2w, c] of the 2x2 grid."""
  h, w, c = cell_shape
  return (2 * h, 2 * w, c)


def compose_grid(cells: np.ndarray) -> np.ndarray:
  """[batch, 4, h, w, c] in reading order -> [batch, 2h, 2w, c]."""
  b, n, h, w, c = cells.shape
  if n != GRID * GRID:
    raise ValueError(f"Expected {GRID * GRID} cells per grid, got {n}.")
  x = cells.reshape(b, GRID, GRID, h, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, GRID * h, GRID * w, c)


def split_grid(grids: np.ndarray) -> np.ndarray:
  """[batch, 2h, 2w, c] -> [batch, 4, h, w, c] in reading order (compose_grid's inverse)."""
  b, hh, ww, c = grids.shape
  h, w = hh // GRID, ww // GRID
  x = grids.reshape(b, GRID, h, GRID, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, GRID * GRID, h, w, c)


def resize_cells(grids: np.ndarray, size: int, channels: int | None = None) -> np.ndarray:
  """uint8 grids [b, 2h, 2w, c] -> uint8 [b, 2 size, 2 size, channels]: each cell resized
  on its own (image.crop_and_resize: bilinear; channels=3 repeats a grey channel)."""
  from mmjax.data import image  # pylint: disable=import-outside-toplevel
  cells = split_grid(grids)
  b, n = cells.shape[:2]
  out = image.crop_and_resize(cells.reshape(b * n, *cells.shape[2:]), size,
                                 channels=channels)
  return compose_grid(out.reshape(b, n, *out.shape[1:]))


def read_cells(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Source examples at indices [batch, 4] -> (images [batch, 4, h, w, c], labels [batch, 4])."""
  flat = indices.reshape(-1)
  if hasattr(source, "gather"):
    ex = source.gather(flat)
  else:
    items = source.__getitems__(flat.tolist())
    ex = {k: np.stack([it[k] for it in items]) for k in ("image", "label")}
  images = ex["image"].reshape(*indices.shape, *ex["image"].shape[1:])
  return images, ex["label"].reshape(indices.shape).astype(np.int32)


def cell_indices(keys: np.ndarray, source_len: int, seed: int) -> np.ndarray:
  """[batch] keys -> [batch, 4] source indices of a grid's cells."""
  return np.stack([draw(keys, source_len, seed, s) for s in _CELL_STREAMS], axis=1)


def train_grids(batch: dict, source, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Training grids for a batch of the training pipeline.

  Args:
    batch: {"image" [b, h, w, c], "label" [b], "position" [b]}: the examples the
      pipeline drew from `source` (each once per epoch) and their stream positions.
    source: the training split; the other three cells are drawn from it.
    seed: the run's seed.

  Returns:
    (images [b, 2h, 2w, c] uint8, labels [b, 4] int32). The pipeline's example sits
    in a cell chosen by hash, the other cells are hashed from (seed, position).
  """
  positions = np.asarray(batch["position"])
  images, labels = read_cells(source, cell_indices(positions, len(source), seed))
  slot = draw(positions, GRID * GRID, seed, _SLOT)
  rows = np.arange(len(positions))
  images[rows, slot] = batch["image"]
  labels[rows, slot] = batch["label"]
  return compose_grid(images), labels


EVAL_GRID_SEED = 0  # Evaluation grids are the same whatever the run's seed.


class GridSource:
  """A fixed set of `num_grids` grids composed from `source` (e.g. the test split).

  Random access like a TFDS data source: example i is {"image" [2h, 2w, c] uint8,
  "labels" [4] int32}, its cells drawn by hash from (seed, i), so every run evaluates
  on the same grids.
  """

  def __init__(self, source, num_grids: int, seed: int = 0):
    self.source = source
    self.num_grids = num_grids
    self.seed = seed

  def __len__(self) -> int:
    return self.num_grids

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    if np.any((indices < 0) | (indices >= self.num_grids)):
      raise IndexError(f"Grid indices must be in [0, {self.num_grids}).")
    images, labels = read_cells(self.source, cell_indices(indices, len(self.source), self.seed))
    return {"image": compose_grid(images), "labels": labels}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    batch = self.gather(np.asarray(indices))
    return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.__getitems__([index])[0]


def questions(labels: np.ndarray, keys: np.ndarray, seed: int, class_names: tuple[str, ...],
              templates: dict[str, tuple[str, ...]], kinds: np.ndarray | None = None,
              kind_weights: tuple[float, ...] = (1.0, 1.0, 1.0)) -> dict[str, object]:
  """Questions about grids and their answers.

  Args:
    labels: [b, 4] class ids of each grid's cells, reading order.
    keys: [b] ints (stream positions, grid indices) that seed each example's draws.
    seed: the run's seed.
    class_names: the dataset's class names, by id.
    templates: {kind: templates}, TRAIN_TEMPLATES or EVAL_TEMPLATES.
    kinds: [b] ids into KINDS; default: drawn by hash, in proportion to `kind_weights`.
    kind_weights: relative frequencies of the kinds in KINDS' order.

  Returns:
    {"question": [b] str, "answer": [b] str, "kind": [b] int32 ids into KINDS}. Count
    and presence ask, half the time, about a class in the grid (presence: else one
    absent from it, so yes and no are equally likely; count: else any class).
  """
  labels, keys = np.asarray(labels), np.asarray(keys)
  if kinds is None:
    edges = np.cumsum(kind_weights) / np.sum(kind_weights)
    kinds = np.minimum(np.searchsorted(edges, uniform(keys, seed, _KIND), side="right"),
                       len(KINDS) - 1)
  cell = draw(keys, GRID * GRID, seed, _WHICH_CELL)
  coin = draw(keys, 2, seed, _COIN)
  other = uniform(keys, seed, _CLASS)
  template_u = uniform(keys, seed, _TEMPLATE)
  out_q, out_a = [], []
  for i, kind_id in enumerate(np.asarray(kinds).tolist()):
    kind = KINDS[kind_id]
    row = labels[i].tolist()
    target = row[cell[i]]
    if kind != "cell" and coin[i]:
      if kind == "presence":
        absent = [c for c in range(len(class_names)) if c not in row]
        target = absent[int(other[i] * len(absent))]
      else:
        target = int(other[i] * len(class_names))
    name = class_names[target]
    kind_templates = templates[kind]
    template = kind_templates[int(template_u[i] * len(kind_templates))]
    out_q.append(template.format(cell=CELLS[cell[i]], name=name, a_name=article(name),
                                 plural=plural(name)))
    if kind == "cell":
      out_a.append(name)
    elif kind == "count":
      out_a.append(NUMBERS[row.count(target)])
    else:
      out_a.append("yes" if target in row else "no")
  return {"question": out_q, "answer": out_a, "kind": np.asarray(kinds, np.int32)}


def matching_captions(labels: np.ndarray, keys: np.ndarray, seed: int,
                      class_names: tuple[str, ...], hard_fraction: float = 0.0,
                      match: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
  """Captions for image-text matching: the grid's own, or a mismatched one.

  Args:
    labels: [b, 4] class ids of the grids' cells.
    keys, seed: as in `questions`.
    class_names: the dataset's class names.
    hard_fraction: the share of negatives that differ from the truth in one cell
      only; the others describe another random grid.
    match: [b] bool, which examples get their own caption; default: a fair coin each.

  Returns:
    (captions [b] str, match [b] float32: 1.0 for the grid's own caption).
  """
  labels, keys = np.asarray(labels), np.asarray(keys)
  num_classes = len(class_names)
  if match is None:
    match = draw(keys, 2, seed, _MATCH) == 1
  hard = uniform(keys, seed, _HARD) < hard_fraction
  random_grid = np.stack([draw(keys, num_classes, seed, s) for s in _NEGATIVE_CELLS], axis=1)
  which = draw(keys, GRID * GRID, seed, _NEGATIVE)
  shift = 1 + draw(keys, num_classes - 1, seed, _CLASS)  # A different class in that cell.
  one_changed = labels.copy()
  rows = np.arange(len(keys))
  one_changed[rows, which] = (labels[rows, which] + shift) % num_classes
  # A random grid that happens to equal the truth becomes a one-cell change.
  same = np.all(random_grid == labels, axis=1)
  negative = np.where((hard | same)[:, None], one_changed, random_grid)
  chosen = np.where(np.asarray(match)[:, None], labels, negative)
  texts = [caption([class_names[c] for c in row]) for row in chosen.tolist()]
  return texts, np.asarray(match, np.float32)


def encode_prompts(texts: list[str], length: int) -> np.ndarray:
  """Questions -> [b, length] int32: BOS and the bytes, padded with PAD on the *left*."""
  ids = tokenizer_lib.ByteTokenizer(length + 1).encode(texts)  # BOS bytes EOS PAD...
  out = np.full((len(texts), length), tokenizer_lib.PAD, np.int32)
  for i, (row, text) in enumerate(zip(ids, texts)):
    n = int(np.argmax(row == tokenizer_lib.EOS))  # BOS + bytes.
    if n != len(text.encode("utf-8")) + 1:
      raise ValueError(f"Question {text!r} does not fit in {length} tokens; raise the length.")
    out[i, length - n:] = row[:n]
  return out


def encode_answers(texts: list[str], length: int) -> np.ndarray:
  """Answers -> [b, length] int32: the bytes, EOS, then PAD."""
  for text in texts:
    if len(text.encode("utf-8")) + 1 > length:
      raise ValueError(f"Answer {text!r} does not fit in {length} tokens; raise the length.")
  return tokenizer_lib.ByteTokenizer(length + 1).encode(texts)[:, 1:]  # Drop BOS.


def decode_answers(tokens: np.ndarray) -> list[str]:
  """[b, length] generated tokens (bytes, EOS, ...) -> strings up to the first EOS."""
  tokens = np.asarray(tokens)
  bos = np.full((len(tokens), 1), tokenizer_lib.BOS, tokens.dtype)
  return tokenizer_lib.ByteTokenizer(tokens.shape[1] + 1).decode(np.concatenate([bos, tokens], 1))


def mlm_mask(tokens: np.ndarray, keys: np.ndarray, seed: int, rate: float) -> np.ndarray:
  """[b, T] tokens -> [b, T] bool: the byte tokens to mask (not BOS/EOS/PAD), >= 1 per row.

  Each byte is masked with probability `rate`, drawn by hash of (seed, key, position).
  """
  tokens, keys = np.asarray(tokens), np.asarray(keys)
  b, t = tokens.shape
  maskable = tokens > tokenizer_lib.EOS
  cell_keys = keys.astype(np.int64)[:, None] * t + np.arange(t)[None, :]
  masked = (uniform(cell_keys.reshape(-1), seed, _MLM).reshape(b, t) < rate) & maskable
  # Rows with nothing masked mask one maskable byte, chosen by hash.
  u = uniform(keys, seed, _MLM + 1)
  count = maskable.sum(axis=1)
  pick = np.minimum((u * count).astype(np.int64), np.maximum(count - 1, 0))
  order = np.cumsum(maskable, axis=1) - 1
  fallback = maskable & (order == pick[:, None])
  return np.where(masked.any(axis=1, keepdims=True), masked, fallback)
