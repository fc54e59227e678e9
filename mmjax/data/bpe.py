"""CLIP's byte-level BPE tokenizer: the token ids of open_clip.tokenize, without PyTorch.

The vocabulary is OpenAI's merges file `bpe_simple_vocab_16e6.txt.gz` (MIT licence),
shipped with mmjax (mmjax/data/assets/, with its licence) and used when no path is given.

Text is cleaned as open_clip's default `clean="lower"` does (ftfy, HTML unescaping twice,
whitespace collapsed, lower-cased), split with CLIP's regular expression, and each piece's
UTF-8 bytes are merged by the BPE model of the `tokenizers` library (end-of-word suffix
"</w>"). Each row is <start_of_text>, the ids, <end_of_text>, then zeros; rows too long are
cut to `context_length` with <end_of_text> last.

Any Python string is accepted (surrogates as `tokenizer.utf8` writes them). The ids of
recent words are cached, at most `cache_size` of them (least recently used first out),
and no word longer than `_LONGEST_CACHED` characters.
"""
import functools
import gzip
import html
import os

import numpy as np

from mmjax.data import tokenizer

# The merges that the vocabulary uses: lines 1 .. 48894 of the file (line 0 is a header).
_NUM_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
DEFAULT_VOCAB = os.path.join(os.path.dirname(__file__), "assets",
                             "bpe_simple_vocab_16e6.txt.gz")
_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_LONGEST_CACHED = 64  # Characters: longer words are merged afresh each time.


def bytes_to_unicode() -> dict[int, str]:
  """The 256 bytes -> printable characters that stand for them in the vocabulary."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean(text: str) -> str:
  """open_clip's `clean="lower"`: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
  import ftfy  # pylint: disable=import-outside-toplevel
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).strip().lower()


class ClipTokenizer:
  """Strings -> int32 [n, context_length]: the ids open_clip.tokenize gives.

  Args:
    vocab_path: CLIP's merges file, `bpe_simple_vocab_16e6.txt.gz` (gzip or plain text);
      None: the copy shipped with mmjax (`DEFAULT_VOCAB`).
    context_length: row length; 77 for every OpenAI and open_clip CLIP.
    cache_size: how many words' ids are kept (the least recently used go first).
  """

  def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = 77,
               cache_size: int = 1 << 16):
    import regex  # pylint: disable=import-outside-toplevel
    from tokenizers import models  # pylint: disable=import-outside-toplevel
    if context_length < 2:
      raise ValueError(f"context_length={context_length}: room is needed for the start and "
                       "end tokens.")
    path = DEFAULT_VOCAB if vocab_path is None else os.fspath(vocab_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"No CLIP BPE vocabulary at {path!r}. Pass the path of bpe_simple_vocab_16e6.txt.gz: "
          "it ships inside the open_clip package (open_clip/bpe_simple_vocab_16e6.txt.gz) and "
          "OpenAI's CLIP repository (clip/bpe_simple_vocab_16e6.txt.gz).")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
      raise ValueError(f"{path}: line {bad + 1} is {lines[bad + 1]!r}, not a merge 'A B'; "
                       "is this CLIP's bpe_simple_vocab_16e6.txt.gz?")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += list(SPECIAL_TOKENS)
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = vocab
    self.vocab_size = len(vocab)
    self.sot_id, self.eot_id = self.encoder[SPECIAL_TOKENS[0]], self.encoder[SPECIAL_TOKENS[1]]
    self.context_length = context_length
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self._bpe = models.BPE({t: i for t, i in self.encoder.items() if t not in SPECIAL_TOKENS},
                           merges, end_of_word_suffix="</w>")
    self._pattern = regex.compile("|".join(SPECIAL_TOKENS) + "|" + _PATTERN, regex.IGNORECASE)
    self._special = {t: (self.encoder[t],) for t in SPECIAL_TOKENS}
    self.cache_size = cache_size
    self._cached_ids = functools.lru_cache(maxsize=cache_size)(self._merge)

  def __getstate__(self):  # Pickled (e.g. for data workers) without the cache.
    return {k: v for k, v in self.__dict__.items() if k != "_cached_ids"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cached_ids = functools.lru_cache(maxsize=self.cache_size)(self._merge)

  def _merge(self, word: str) -> tuple[int, ...]:
    chars = "".join(self._byte_encoder[b] for b in tokenizer.utf8(word))
    return tuple(t.id for t in self._bpe.tokenize(chars))

  def _word_ids(self, word: str) -> tuple[int, ...]:
    ids = self._special.get(word)
    if ids is not None:
      return ids
    return self._cached_ids(word) if len(word) <= _LONGEST_CACHED else self._merge(word)

  def ids(self, text: str) -> list[int]:
    """One text -> its BPE ids, without the start and end tokens and not truncated."""
    out = []
    for word in self._pattern.findall(clean(text)):
      out.extend(self._word_ids(word))
    return out

  def encode(self, texts: str | list[str]) -> np.ndarray:
    """[n] strings (or one) -> int32 [n, context_length]; zeros after <end_of_text>."""
    texts = [texts] if isinstance(texts, str) else texts
    out = np.zeros((len(texts), self.context_length), np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot_id] + self.ids(text) + [self.eot_id]
      if len(ids) > self.context_length:
        ids = ids[:self.context_length - 1] + [self.eot_id]
      out[i, :len(ids)] = ids
    return out

  def decode(self, tokens: np.ndarray) -> list[str]:
    """[n, len] ids -> the texts between the start token and the first end token (cleaned)."""
    texts = []
    for row in np.asarray(tokens).reshape(-1, np.shape(tokens)[-1]):
      row = [int(t) for t in row]
      row = row[1:] if row and row[0] == self.sot_id else row
      row = row[:row.index(self.eot_id)] if self.eot_id in row else row
      chars = "".join(self.decoder[t] for t in row if t < self.sot_id)
      text = bytearray(self._byte_decoder[c] for c in chars).decode("utf-8", "replace")
      texts.append(text.replace("</w>", " ").strip())
    return texts
