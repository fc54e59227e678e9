"""experiments/lit_mnist.py end to end on synthetic data: the image tower of a CLIP run
stays exactly as loaded, the text tower trains from scratch."""
import jax
import numpy as np
import pytest

from mmjax import tasks
from mmjax import runs
from mmjax import parallel
from mmjax.train import trainer

from test_experiments_mock import _config, synthetic_mnist  # pylint: disable=unused-import


def _run(config, workdir):
  mesh = parallel.make_mesh(jax.devices()[:1])
  return trainer.train_and_evaluate(config, str(workdir), tasks.get_task(config, mesh), mesh)


@pytest.mark.slow
def test_lit_locks_the_clip_runs_image_tower_and_trains_a_new_text_tower(tmp_path):
  clip = _config("clip_mnist", "smoke")
  clip.num_train_steps, clip.checkpoint_every_steps = 3, 3
  _run(clip, tmp_path / "clip")
  lit = _config("lit_mnist", f"smoke,clip_workdir={tmp_path / 'clip'}")
  lit.num_train_steps, lit.checkpoint_every_steps = 3, 3
  final = _run(lit, tmp_path / "lit")
  assert 0.0 <= final["eval/zeroshot_top1"] <= 1.0
  source = runs.load_run(str(tmp_path / "clip")).params
  after = runs.load_run(str(tmp_path / "lit")).params
  for part in ("image_tower", "image_proj"):
    jax.tree.map(np.testing.assert_array_equal, after[part], source[part])
  # The text tower is not the CLIP run's: it started from random (and trained).
  emb_a = after["text_tower"]["token_embedding"]["embedding"]
  assert not np.allclose(emb_a, source["text_tower"]["token_embedding"]["embedding"])


def test_lit_without_a_source_is_a_clear_error():
  config = _config("lit_mnist", "smoke")
  mesh = parallel.make_mesh(jax.devices()[:1])
  with pytest.raises(ValueError, match="set config.warm_start.workdir or config.init_from"):
    tasks.get_task(config, mesh).setup()


@pytest.mark.slow
def test_warm_start_from_a_workdir_with_the_wrong_model_is_a_clear_error(tmp_path):
  clip = _config("clip_mnist", "smoke")
  clip.num_train_steps, clip.checkpoint_every_steps = 1, 1
  _run(clip, tmp_path / "clip")
  lit = _config("lit_mnist", f"smoke,clip_workdir={tmp_path / 'clip'}")
  lit.model.embed_dim = 32
  mesh = parallel.make_mesh(jax.devices()[:1])
  task = tasks.get_task(lit, mesh)
  task.setup()
  with pytest.raises(ValueError, match=r"warm_start.include: 'image_proj/kernel' of shape "
                                       r"\(64, 32\) is of shape \(64, 64\) there"):
    task.pretrained()
  # Parameters from an extra the run does not have (a CLIP run keeps no EMA): in setup.
  lit = _config("lit_mnist", f"smoke,clip_workdir={tmp_path / 'clip'}")
  lit.warm_start.source = "ema"
  with pytest.raises(ValueError, match=r"warm_start.source='ema': the run in .* has no such "
                                       r"extra \(it has \[\]\); use 'params'"):
    tasks.get_task(lit, mesh).setup()
