"""Sample-quality measures: Fréchet distance between feature sets, and image grids."""
import numpy as np


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """[n, d] features -> (mean [d], covariance [d, d]), in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"Need features [n >= 2, dim], got shape {f.shape}.")
  return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(features_a, features_b) -> float:
  """Fréchet distance between Gaussians fitted to two [n, d] feature sets.

  |mu_a − mu_b|² + Tr(S_a + S_b − 2·(S_a S_b)^½) (Dowson & Landau 1982; FID's formula).
  Tr((S_a S_b)^½) is computed as the sum of the square roots of the eigenvalues of
  the symmetric S_a^½ S_b S_a^½, which is stable where a general matrix square root
  is not.
  """
  mu_a, cov_a = gaussian_stats(features_a)
  mu_b, cov_b = gaussian_stats(features_b)
  w, v = np.linalg.eigh(cov_a)
  sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
  trace_sqrt = np.sum(np.sqrt(np.clip(cross, 0, None)))
  return float(np.sum((mu_a - mu_b)**2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def image_grid(images, rows: int) -> np.ndarray:
  """[rows·cols, h, w, c] images in [0, 1] -> one uint8 image [1, rows·h, cols·w, c].

  Row r holds images r·cols .. (r+1)·cols − 1, e.g. one row per prompt.
  """
  images = np.asarray(images)
  n, h, w, c = images.shape
  if n % rows:
    raise ValueError(f"{n} images do not fill {rows} rows.")
  grid = images.reshape(rows, n // rows, h, w, c).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(1, rows * h, (n // rows) * w, c)
  return (np.clip(grid, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
