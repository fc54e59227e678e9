"""CLIP's BPE tokenizer against open_clip's ids (tests/fixtures/clip/tokenizer.json).

The fixture is made by tools/make_interop_fixtures.py with open_clip; this test needs
neither PyTorch nor open_clip.
"""
import json
import pathlib

import numpy as np
import pytest

from mmjax.data import bpe

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "clip"
VOCAB = FIXTURES / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def fixture():
  return json.loads((FIXTURES / "tokenizer.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
  return bpe.ClipTokenizer(VOCAB)


def _padded(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clip(fixture, context_length):
  texts = fixture["texts"]
  assert len(texts) >= 200
  expected = _padded(fixture["ids"][str(context_length)], context_length)
  ids = bpe.ClipTokenizer(VOCAB, context_length).encode(texts)
  assert ids.shape == expected.shape and ids.dtype == np.int32
  wrong = [texts[i] for i in np.flatnonzero((ids != expected).any(axis=1))]
  assert not wrong, f"{len(wrong)} texts tokenized differently, e.g. {wrong[:3]}"


def test_layout_truncation_and_decode(tokenizer):
  assert tokenizer.vocab_size == 49408
  assert (tokenizer.sot_id, tokenizer.eot_id) == (49406, 49407)
  ids = tokenizer.encode(["A photo of a CAT.", "dog " * 200])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert ids[0, 0] == tokenizer.sot_id and ids[0, 7] == tokenizer.eot_id
  assert np.all(ids[0, 8:] == 0)
  assert ids[1, -1] == tokenizer.eot_id and np.all(ids[1] != 0)  # Cut, end token kept.
  assert tokenizer.decode(ids) == ["a photo of a cat .", " ".join(["dog"] * 75)]
  assert tokenizer.encode("one text").shape == (1, 77)


def test_missing_vocabulary_says_where_to_find_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="open_clip/bpe_simple_vocab_16e6.txt.gz"):
    bpe.ClipTokenizer(tmp_path / "nowhere.txt.gz")
  bad = tmp_path / "bad.txt"
  bad.write_text("header\nnot-a-merge\n")
  with pytest.raises(ValueError, match="not a merge"):
    bpe.ClipTokenizer(bad)
