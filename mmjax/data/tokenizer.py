"""A byte-level tokenizer: UTF-8 bytes plus PAD/BOS/EOS ids. Nothing to download.

Any Python string is accepted: surrogate code points, which UTF-8 cannot hold, are
joined where two form a pair and become U+FFFD (the replacement character) alone.
"""
import numpy as np

PAD, BOS, EOS = 0, 1, 2
_OFFSET = 3
VOCAB_SIZE = 256 + _OFFSET


def utf8(text: str) -> bytes:
  """`text` as UTF-8; a surrogate pair as its character, a lone surrogate as U+FFFD."""
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError:  # Surrogates: Python strings may hold them, UTF-8 cannot.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").encode(
        "utf-8")


class ByteTokenizer:
  """Strings <-> int32 [n, max_len] arrays: BOS, the UTF-8 bytes, EOS, then PAD.

  Texts longer than `max_len - 2` bytes are cut; EOS always ends the sequence.
  """

  def __init__(self, max_len: int):
    if max_len < 3:
      raise ValueError(f"max_len={max_len}: room is needed for BOS, EOS and a byte.")
    self.max_len = max_len
    self.vocab_size = VOCAB_SIZE

  def encode(self, texts: list[str]) -> np.ndarray:
    out = np.full((len(texts), self.max_len), PAD, np.int32)
    for i, text in enumerate(texts):
      ids = np.frombuffer(utf8(text)[:self.max_len - 2], np.uint8).astype(np.int32)
      out[i, 0] = BOS
      out[i, 1:1 + len(ids)] = ids + _OFFSET
      out[i, 1 + len(ids)] = EOS
    return out

  def decode(self, tokens: np.ndarray) -> list[str]:
    """[n, len] ids -> strings: the bytes between BOS and the first EOS."""
    texts = []
    for row in np.asarray(tokens):
      ids = [int(t) for t in row[1:]]
      ids = ids[:ids.index(EOS)] if EOS in ids else ids
      texts.append(bytes(t - _OFFSET for t in ids if t >= _OFFSET).decode("utf-8", "replace"))
    return texts
