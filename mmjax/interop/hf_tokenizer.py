"""A Hugging Face folder's tokenizer: the ids transformers gives, with the `tokenizers` library.

  tok = hf_tokenizer.PretrainedTokenizer("clip-vit-base-patch32", context_length=77)
  tok.encode(["a photo of a cat"])  # int32 [1, 77]

The ids are those of `AutoTokenizer.from_pretrained(folder)(texts, padding="max_length",
truncation=True, max_length=context_length)`: the folder's `tokenizer.json` is read by
`tokenizers`, the library transformers runs it with. A CLIP folder with only `vocab.json`
and `merges.txt` gets the pipeline of transformers' CLIPTokenizer (NFC, whitespace
collapsed, lower case, CLIP's pre-tokenizer, byte-level BPE with "</w>", start and end
tokens). SigLIP's SentencePiece `spiece.model` is not read (that would need the
`sentencepiece` package): tokenize SigLIP text with transformers' SiglipTokenizer, or
save its `tokenizer.json` into the folder.
"""
import json
import os

import numpy as np

from mmjax.interop.common import CheckpointError

_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+"""
               r"""|[\p{N}]|[^\s\p{L}\p{N}]+""")
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def has_tokenizer(folder: str | os.PathLike) -> bool:
  """Whether `PretrainedTokenizer` can read the folder's tokenizer."""
  folder = os.fspath(folder)
  exists = lambda name: os.path.isfile(os.path.join(folder, name))
  return exists("tokenizer.json") or (exists("vocab.json") and exists("merges.txt"))


def _token(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def _clip_bpe(folder: str):
  """transformers' CLIPTokenizer pipeline from vocab.json and merges.txt."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, Regex, Tokenizer
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
  # pylint: enable=import-outside-toplevel
  with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")
              if line and not line.startswith("#version")]
  missing = [t for t in _CLIP_SPECIALS if t not in vocab]
  if missing:
    raise CheckpointError(f"{folder}: vocab.json has no {missing[0]!r}: is this CLIP's "
                          "tokenizer?")
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                             end_of_word_suffix="</w>", fuse_unk=False,
                             unk_token=_CLIP_SPECIALS[1]))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in _CLIP_SPECIALS])
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
       pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  bos, eos = (vocab[t] for t in _CLIP_SPECIALS)
  tok.post_processor = processors.RobertaProcessing((_CLIP_SPECIALS[1], eos),
                                                    (_CLIP_SPECIALS[0], bos), False, False)
  return tok


class PretrainedTokenizer:
  """Strings -> int32 [n, context_length]: a Hugging Face folder's ids, padded and cut.

  Args:
    folder: with tokenizer.json, or (CLIP) vocab.json and merges.txt; the padding token
      is tokenizer_config.json's `pad_token` (CLIP's "<|endoftext|>" by default).
    context_length: row length (the text tower's positions, e.g. 77 for CLIP).
  """

  def __init__(self, folder: str | os.PathLike, context_length: int):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      self._tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif has_tokenizer(folder):
      self._tok = _clip_bpe(folder)
    else:
      spiece = os.path.isfile(os.path.join(folder, "spiece.model"))
      raise CheckpointError(
          f"{folder}: no tokenizer.json, nor vocab.json and merges.txt"
          + (" (spiece.model, SigLIP's SentencePiece tokenizer, is not read: tokenize with "
             "transformers' SiglipTokenizer, or save its tokenizer.json here)" if spiece else "")
          + ".")
    settings = {}
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    pad = _token(settings.get("pad_token")) or _CLIP_SPECIALS[1]
    self.pad_id = self._tok.token_to_id(pad)
    if self.pad_id is None:
      raise CheckpointError(f"{folder}: the padding token {pad!r} is not in the vocabulary.")
    self.context_length = int(context_length)
    self.vocab_size = self._tok.get_vocab_size()
    self._tok.no_padding()
    self._tok.enable_truncation(self.context_length)

  def encode(self, texts: str | list[str]) -> np.ndarray:
    """[n] strings (or one) -> int32 [n, context_length], padded with the padding id."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    for i, enc in enumerate(self._tok.encode_batch(texts)):
      out[i, :len(enc.ids)] = enc.ids
    return out
