"""config.init_from for the VQA and ImageBERT tasks: their ViT starts as an open_clip tower.

Fast: the small random open_clip fixture of tests/fixtures/clip/ (32-pixel images, patch
8, OpenAI's layout, QuickGELU) and a synthetic 28-pixel training split in place of MNIST.
"""
import pathlib

import jax
import numpy as np
import pytest

from experiments import imagebert_mnist
from experiments import vqa_mnist
from mmjax import losses
from mmjax import tasks
from mmjax.data import image
from mmjax.data import sources
from mmjax.interop import open_clip
from mmjax import losses
from mmjax.models import vit
from mmjax import parallel
from mmjax import tasks
from mmjax.train import trainer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "clip"
WEIGHTS = FIXTURES / "quickgelu_p8.safetensors"  # 32x32 images; open_clip's outputs in .npz.
LOAD = dict(quick_gelu=True, vision_heads=4, text_heads=4)
EXPERIMENTS = {"vqa": vqa_mnist, "imagebert": imagebert_mnist}


class _Source(list):
  """A list of examples read as a data source is (`__getitems__`, as grain's)."""

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def _source(n: int = 32) -> _Source:
  """A stand-in for MNIST's training split: random 28x28x1 uint8 digits, labels 0-9."""
  rng = np.random.default_rng(0)
  return _Source({"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
                  "label": np.int64(i % 10)} for i in range(n))


@pytest.fixture(name="synthetic_mnist")
def _synthetic_mnist(monkeypatch):
  monkeypatch.setattr(sources, "load_source", lambda *args, **kwargs: _source())


def _config(name: str, **fields):
  c = EXPERIMENTS[name].get_config("smoke")
  c.init_from = str(WEIGHTS)
  c.update(LOAD)
  c.frozen = ("vision/.*",)
  c.global_batch_size = 8
  c.update(fields)
  return c


@pytest.fixture(name="loaded", scope="module")
def _loaded():
  return open_clip.load(WEIGHTS, **LOAD)


@pytest.mark.slow  # Training runs.
@pytest.mark.parametrize("name", ["vqa", "imagebert"])
def test_starts_from_the_files_image_tower_and_trains(name, synthetic_mnist, loaded):
  clip, clip_params = loaded
  config, mesh = _config(name), parallel.make_mesh()
  task = tasks.get_task(config, mesh)
  task.setup()
  assert task.image_shape == (64, 64, 3)  # Each 28-pixel cell resized to the file's 32.
  state, opt = trainer.create_train_state(config, task, mesh)
  params = jax.device_get(state.params)
  tower = clip_params["image_tower"]
  assert jax.tree.structure(params["vision"]) == jax.tree.structure(tower)
  jax.tree.map(np.testing.assert_array_equal, params["vision"], tower)

  # The task's ViT on open_clip's own inputs gives open_clip's image embeddings.
  ref = np.load(FIXTURES / "quickgelu_p8.npz")
  m = task.model
  tok = vit.ViT(m.vision_variant, pool="tok", **vit.layout_options(m.vision_options))
  features = tok.apply({"params": params["vision"]}, ref["images_nhwc"])
  emb = losses.l2_normalise(features @ clip_params["image_proj"]["kernel"])
  np.testing.assert_allclose(emb, ref["image_emb"], atol=1e-5)
  if name == "vqa":  # The VLM's own ViT call: every token, the class token first.
    tokens = m.apply({"params": params}, ref["images_nhwc"], method=lambda v, x: v.vision(x))
    np.testing.assert_allclose(tokens[:, 0], features, atol=1e-6)

  # One training step on the task's own preprocessing: finite, the frozen ViT kept.
  source = _source()
  batch = task.train_preprocess({"image": np.stack([s["image"] for s in source[:8]]),
                                 "label": np.array([s["label"] for s in source[:8]]),
                                 "position": np.arange(8)})
  state, metrics = trainer.jit_train_step(task, opt, mesh)(state, batch)
  assert float(metrics["train/finite"]) == 1.0 and np.isfinite(float(metrics["train/loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["vision"]), tower)


def test_cells_are_resized_and_normalised_as_clip_task_does(synthetic_mnist):
  task = tasks.get_task(_config("vqa"), parallel.make_mesh())
  grids = np.random.default_rng(1).integers(0, 256, (2, 56, 56, 1), dtype=np.uint8)
  images = task.images(grids)  # [2, 64, 64, 3]
  assert images.shape == (2, 64, 64, 3)
  for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):
    cell = grids[:, 28 * row:28 * (row + 1), 28 * col:28 * (col + 1)]
    want = image.normalize(image.crop_and_resize(cell, 32, channels=3),
                                       image.CLIP_MEAN, image.CLIP_STD)
    np.testing.assert_array_equal(images[:, 32 * row:32 * (row + 1), 32 * col:32 * (col + 1)],
                                  want)


@pytest.mark.parametrize("name", ["vqa", "imagebert"])
def test_init_from_and_clip_workdir_is_an_error(name):
  with pytest.raises(ValueError, match="pick one"):
    tasks.get_task(_config(name, clip_workdir="workdirs/clip_mnist"), parallel.make_mesh())


def test_imagebert_init_from_needs_region_features():
  config = _config("imagebert")
  config.model.vision_variant = None
  with pytest.raises(ValueError, match="init_from needs a ViT"):
    tasks.get_task(config, parallel.make_mesh())
