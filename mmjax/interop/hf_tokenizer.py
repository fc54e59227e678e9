"""A Hugging Face folder's tokenizer: the ids transformers gives, with the `tokenizers` library.

  tok = hf_tokenizer.PretrainedTokenizer("clip-vit-base-patch32", context_length=77)
  tok.encode(["a photo of a cat"])  # int32 [1, 77]

The ids are those of `AutoTokenizer.from_pretrained(folder)(texts, padding="max_length",
truncation=True, max_length=context_length)`, for a CLIP or SigLIP model folder and for
a Stable Diffusion pipeline's `tokenizer/` alike: the folder's `tokenizer.json` (what
transformers 5 writes) is read by `tokenizers`, the library transformers runs it with. A
CLIP folder with only `vocab.json` and `merges.txt` (what older versions wrote, and what
SD 1.x/2.x repositories hold) gets the pipeline of transformers' CLIPTokenizer (NFC,
whitespace collapsed, lower case, CLIP's pre-tokenizer, byte-level BPE with "</w>", start
and end tokens). The special tokens come from `special_tokens_map.json` and
`tokenizer_config.json`: the padding token is "<|endoftext|>" for SD 1.x and "!" for
SD 2.x. SigLIP's SentencePiece `spiece.model` is not read (that would need the
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


def _settings(folder: str) -> dict:
  """special_tokens_map.json updated with tokenizer_config.json (either may be absent)."""
  settings = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        settings.update(json.load(f))
  return settings


def _clip_bpe(folder: str, settings: dict):
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
  # The folder's special tokens are matched whole, as transformers does (SD 2.x pads
  # with "!", which then never merges with its neighbours).
  specials = [_token(settings.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad")]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in dict.fromkeys([*_CLIP_SPECIALS, *filter(None, specials)])])
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
      is the folder's `pad_token` (CLIP's "<|endoftext|>" by default).
    context_length: row length (the text tower's positions); default the folder's
      `model_max_length` when at most 77, else 77 (every CLIP text encoder's context).
  """

  def __init__(self, folder: str | os.PathLike, context_length: int | None = None):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      self._tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif has_tokenizer(folder):
      self._tok = _clip_bpe(folder, _settings(folder))
    else:
      if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such tokenizer folder.")
      spiece = os.path.isfile(os.path.join(folder, "spiece.model"))
      raise CheckpointError(
          f"{folder}: no tokenizer.json, nor vocab.json and merges.txt"
          + (" (spiece.model, SigLIP's SentencePiece tokenizer, is not read: tokenize with "
             "transformers' SiglipTokenizer, or save its tokenizer.json here)" if spiece else "")
          + ".")
    settings = _settings(folder)
    pad = _token(settings.get("pad_token")) or _CLIP_SPECIALS[1]
    self.pad_id = self._tok.token_to_id(pad)
    if self.pad_id is None:
      raise CheckpointError(f"{folder}: the padding token {pad!r} is not in the vocabulary.")
    # The start and end tokens, where the folder has them (None for SigLIP's start).
    self.bos_id, self.eos_id = (self._tok.token_to_id(_token(settings.get(k)) or "")
                                for k in ("bos_token", "eos_token"))
    configured = settings.get("model_max_length")
    if context_length is None:
      context_length = int(configured) if configured and configured <= 77 else 77
    if int(context_length) < 2:
      raise CheckpointError(f"context_length={context_length}: room is needed for the start "
                            "and end tokens.")
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
