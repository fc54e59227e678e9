"""VQA and matching data on 2x2 grids: determinism, split separation, answers, encodings."""
import re

import numpy as np
import pytest

from mmjax.data import captions
from mmjax.data import batching
from mmjax.data import sources
from mmjax.data import tokenizer
from mmjax.data import vqa

NAMES = captions.CLASS_NAMES["mnist"]


def _source(n, split_id):
  """A fake split: image i holds (split_id, i) in its first two pixels; label i % 10."""
  images = np.zeros((n, 28, 28, 1), np.uint8)
  images[:, 0, 0, 0] = split_id
  images[:, 0, 1, 0] = np.arange(n) % 256
  images[:, 0, 2, 0] = np.arange(n) // 256
  return sources.ArraySource({"image": images, "label": (np.arange(n) % 10).astype(np.int64)})


def _cell_ids(grid):
  """[b, 56, 56, 1] grids -> ([b, 4] split ids, [b, 4] source indices) of their cells."""
  cells = grid.reshape(-1, 2, 28, 2, 28).transpose(0, 1, 3, 2, 4).reshape(-1, 4, 28, 28)
  cells = cells.astype(np.int64)
  return cells[..., 0, 0], cells[..., 0, 1] + 256 * cells[..., 0, 2]


def _train_batch(source, positions, seed=0):
  indices = np.asarray(positions) * 7 % len(source)  # Stand-ins for the pipeline's draws.
  batch = {**source.gather(indices), "position": np.asarray(positions)}
  return vqa.train_grids(batch, source, seed), indices


def test_train_grids_are_deterministic_from_the_train_split_only():
  train = _source(600, split_id=1)
  (images, labels), indices = _train_batch(train, np.arange(50))
  (again, labels_again), _ = _train_batch(train, np.arange(50))
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(labels, labels_again)
  split, idx = _cell_ids(images)
  assert images.shape == (50, 56, 56, 1) and labels.shape == (50, 4)
  assert np.all(split == 1)
  np.testing.assert_array_equal(labels, idx % 10)  # The labels are the cells' own.
  # The pipeline's example is one of the four cells of its grid.
  assert all(indices[i] in idx[i] for i in range(50))
  # Another seed, other grids; other positions, other grids.
  (other, _), _ = _train_batch(train, np.arange(50), seed=1)
  assert np.mean(np.all(_cell_ids(other)[1] == idx, axis=1)) < 0.1
  (later, _), _ = _train_batch(train, np.arange(50, 100))
  assert not np.array_equal(_cell_ids(later)[1], idx)


def test_eval_grids_are_fixed_and_from_the_test_split_only():
  test = _source(300, split_id=2)
  grids = vqa.GridSource(test, num_grids=40, seed=0)
  assert len(grids) == 40
  batch = grids.gather(np.arange(40))
  np.testing.assert_array_equal(batch["image"], vqa.GridSource(test, 40).gather(np.arange(40))["image"])
  split, idx = _cell_ids(batch["image"])
  assert np.all(split == 2)
  np.testing.assert_array_equal(batch["labels"], idx % 10)
  np.testing.assert_array_equal(grids[7]["image"], batch["image"][7])
  with pytest.raises(IndexError):
    grids.gather(np.array([40]))
  # Through the evaluation pipeline: each grid once, the last batch padded and masked.
  ds = batching.eval_dataset(grids, global_batch_size=16, preprocess=lambda b: b)
  seen = [b["position"][b["mask"] > 0] for b in ds]
  np.testing.assert_array_equal(np.concatenate(seen), np.arange(40))


def test_questions_answers_agree_with_the_grid():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, (600, 4))
  qa = vqa.questions(labels, np.arange(600), 0, NAMES, vqa.TRAIN_TEMPLATES)
  assert set(np.unique(qa["kind"])) == {0, 1, 2}
  presence_yes = []
  for row, q, a, kind in zip(labels, qa["question"], qa["answer"], qa["kind"]):
    names = [NAMES[c] for c in row]
    if vqa.KINDS[kind] == "cell":
      cell = next(c for c in vqa.CELLS if c in q)
      assert a == names[vqa.CELLS.index(cell)], (q, a, names)
    elif vqa.KINDS[kind] == "count":
      name = next(n for n in NAMES if re.search(rf"\b{vqa.plural(n)}\b", q))
      assert a == vqa.NUMBERS[names.count(name)], (q, a, names)
    else:
      name = next(n for n in NAMES if re.search(rf"\ban? {n}\b", q))
      assert a == ("yes" if name in names else "no"), (q, a, names)
      presence_yes.append(a == "yes")
  assert 0.35 < np.mean(presence_yes) < 0.65  # Yes and no about equally often.
  again = vqa.questions(labels, np.arange(600), 0, NAMES, vqa.TRAIN_TEMPLATES)
  assert again["question"] == qa["question"] and again["answer"] == qa["answer"]


def test_eval_phrasings_are_held_out():
  train = set(sum(vqa.TRAIN_TEMPLATES.values(), ()))
  assert not train & set(sum(vqa.EVAL_TEMPLATES.values(), ()))
  labels = np.random.default_rng(1).integers(0, 10, (300, 4))
  keys = np.arange(300)
  train_q = set(vqa.questions(labels, keys, 0, NAMES, vqa.TRAIN_TEMPLATES)["question"])
  eval_qa = vqa.questions(labels, keys, 0, NAMES, vqa.EVAL_TEMPLATES, kinds=keys % 3)
  assert not train_q & set(eval_qa["question"])
  np.testing.assert_array_equal(eval_qa["kind"], keys % 3)


def test_english():
  assert vqa.article("eight") == "an eight" and vqa.article("one") == "a one"
  assert vqa.plural("six") == "sixes" and vqa.plural("dress") == "dresses"
  assert vqa.caption(["seven", "two", "nine", "eight"]) == "a seven, a two, a nine and an eight"


def test_matching_captions_positives_and_negatives():
  labels = np.random.default_rng(2).integers(0, 10, (400, 4))
  keys = np.arange(400)
  own = [vqa.caption([NAMES[c] for c in row]) for row in labels]
  texts, match = vqa.matching_captions(labels, keys, 0, NAMES, hard_fraction=0.5)
  assert 0.4 < match.mean() < 0.6
  for t, m, o in zip(texts, match, own):
    assert (t == o) == bool(m)
  texts, match = vqa.matching_captions(labels, keys, 0, NAMES, hard_fraction=1.0,
                                       match=np.zeros(400, bool))
  for t, o in zip(texts, own):  # Exactly one cell's class differs.
    assert sum(a != b for a, b in zip(re.split(r", | and ", t), re.split(r", | and ", o))) == 1


def test_prompt_and_answer_encodings():
  prompts = vqa.encode_prompts(["is there a one?", "count the twos."], 20)
  assert prompts.shape == (2, 20)
  assert prompts[0, -1] != tokenizer.PAD and prompts[0, 0] == tokenizer.PAD
  assert prompts[0, 20 - 16] == tokenizer.BOS and (prompts[0, :4] == tokenizer.PAD).all()
  answers = vqa.encode_answers(["seven", "no"], 8)
  assert answers[0, 5] == tokenizer.EOS and answers[1, 2] == tokenizer.EOS
  assert vqa.decode_answers(answers) == ["seven", "no"]
  with pytest.raises(ValueError, match="does not fit"):
    vqa.encode_prompts(["a much longer question than twenty bytes?"], 20)
  with pytest.raises(ValueError, match="does not fit"):
    vqa.encode_answers(["seventeen"], 8)


def test_mlm_mask_masks_only_bytes_and_at_least_one_per_row():
  tokens = tokenizer.ByteTokenizer(44).encode(["a one, a two, a six and a nine", "a b"] * 50)
  mask = vqa.mlm_mask(tokens, np.arange(100), 0, rate=0.15)
  assert not mask[tokens <= tokenizer.EOS].any()
  assert mask.any(axis=1).all()
  assert 0.1 < mask[0::2].sum() / (tokens[0::2] > tokenizer.EOS).sum() < 0.2
  np.testing.assert_array_equal(mask, vqa.mlm_mask(tokens, np.arange(100), 0, rate=0.15))
