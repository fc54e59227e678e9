"""Per-example draws keyed by stream position (mmjax/data/seeded.py)."""
import numpy as np
import pytest

from mmjax.data import seeded


def test_choice_is_reproducible_and_uses_every_template():
  pos = np.arange(5000)
  a = seeded.choice(pos, 12, seed=0)
  np.testing.assert_array_equal(a, seeded.choice(pos, 12, seed=0))
  assert not np.array_equal(a, seeded.choice(pos, 12, seed=1))
  counts = np.bincount(a, minlength=12)
  assert counts.min() > 300 and counts.max() < 550  # Roughly uniform: 5000 / 12 = 417.


def test_uniform_is_reproducible_and_uniform():
  u = seeded.uniform(np.arange(100_000), seed=3)
  assert np.array_equal(u, seeded.uniform(np.arange(100_000), seed=3))
  assert not np.array_equal(u, seeded.uniform(np.arange(100_000), seed=4))
  assert 0.0 <= u.min() and u.max() < 1.0
  assert np.mean(u < 0.1) == pytest.approx(0.1, abs=0.005)
