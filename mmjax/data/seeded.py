"""Per-example pseudo-random draws keyed by the example's stream position.

A resumed run, or one read by another number of processes, sees each example at the
same position, so these draws (caption templates, crops, dropped captions) repeat
exactly. Pure NumPy, vectorised over a batch of positions.
"""
import numpy as np


def mix(x: np.ndarray, seed: int) -> np.ndarray:
  """A vectorised 64-bit hash (splitmix64 finaliser) of integers with a seed."""
  with np.errstate(over="ignore"):  # Multiplication modulo 2**64 is the point.
    z = x.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def choice(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
  """[batch] stream positions -> [batch] ints in [0, n), e.g. template ids."""
  return (mix(positions, seed) % np.uint64(n)).astype(np.int64)


def uniform(positions: np.ndarray, seed: int) -> np.ndarray:
  """[batch] stream positions -> [batch] floats in [0, 1), e.g. for coin flips (dropping
  the caption for classifier-free guidance) or crop sizes."""
  return (mix(positions, seed) >> np.uint64(11)).astype(np.float64) / float(2**53)
