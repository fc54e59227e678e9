"""transformers' CLIPTokenizer from its folder: the ids a Stable Diffusion pipeline feeds CLIP.

A tokenizer folder holds `tokenizer.json` (what transformers 5 writes), or `vocab.json` +
`merges.txt` (what older versions wrote, and what SD 1.x/2.x repositories hold), with
the special tokens in `tokenizer_config.json` / `special_tokens_map.json`. Either way
the `tokenizers` library runs the same pipeline as transformers' CLIPTokenizer (NFC,
whitespace collapsed, lower case, CLIP's split, byte-level BPE with "</w>"), and
`encode` pads and truncates as diffusers asks (padding="max_length", truncation=True):
<|startoftext|>, at most max_length − 2 ids, <|endoftext|>, then the pad token (which
is <|endoftext|> for SD 1.x and "!" for SD 2.x).
"""
import json
import os

import numpy as np


def _content(token):
  """A special token as tokenizer_config.json writes it (a string or an AddedToken dict)."""
  return token.get("content") if isinstance(token, dict) else token


class CLIPTokenizer:
  """Strings -> int32 [n, max_length] ids equal to transformers' CLIPTokenizer's.

  Args:
    folder: the tokenizer folder (a pipeline's `tokenizer/`).
    max_length: row length; default the config's model_max_length when at most 77, else
      77 (every CLIP text encoder's context).
  """

  def __init__(self, folder: str | os.PathLike, max_length: int | None = None):
    from tokenizers import AddedToken, Regex, Tokenizer  # pylint: disable=import-outside-toplevel
    from tokenizers import decoders, models, normalizers, pre_tokenizers  # pylint: disable=import-outside-toplevel
    folder = os.fspath(folder)
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
          config.update(json.load(f))
    special = {k: _content(config.get(f"{k}_token", default)) for k, default in (
        ("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"), ("unk", "<|endoftext|>"),
        ("pad", "<|endoftext|>"))}
    files = {n: os.path.join(folder, n) for n in ("tokenizer.json", "vocab.json", "merges.txt")}
    if os.path.isfile(files["tokenizer.json"]):
      tok = Tokenizer.from_file(files["tokenizer.json"])
      tok.no_padding()
      tok.no_truncation()
    elif os.path.isfile(files["vocab.json"]) and os.path.isfile(files["merges.txt"]):
      tok = Tokenizer(models.BPE.from_file(
          files["vocab.json"], files["merges.txt"], continuing_subword_prefix="",
          end_of_word_suffix="</w>", fuse_unk=False, unk_token=special["unk"]))
      tok.normalizer = normalizers.Sequence(
          [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(
              r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
              r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False)])
      tok.decoder = decoders.ByteLevel()
      tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t in dict.fromkeys(special.values())])
    else:
      found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
      raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt "
                              f"(found {found}); is this a CLIPTokenizer folder?")
    self._tok = tok
    ids = {k: tok.token_to_id(t) for k, t in special.items()}
    missing = [special[k] for k, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"{folder}: special token {missing[0]!r} is not in the vocabulary.")
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
    self.vocab_size = tok.get_vocab_size()
    configured = config.get("model_max_length")
    self.max_length = max_length or (int(configured) if configured and configured <= 77
                                     else 77)
    if self.max_length < 2:
      raise ValueError(f"max_length={self.max_length}: room is needed for the start and end "
                       "tokens.")

  def ids(self, text: str) -> list[int]:
    """One text -> its ids without the start and end tokens, not truncated."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode(self, texts: str | list[str]) -> np.ndarray:
    """[n] strings (or one) -> int32 [n, max_length]."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for i, row in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
      ids = [self.bos_id] + row.ids[:self.max_length - 2] + [self.eos_id]
      out[i, :len(ids)] = ids
    return out
