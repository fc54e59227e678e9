"""The VQA and ImageBERT experiments end to end (smoke runs on 8 fake devices), CLIP init."""
import importlib.util
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import launch_helpers as lh
from mmjax import models
from mmjax import parallel
from mmjax.tasks import imagebert as imagebert_task
from mmjax.tasks import vqa as vqa_task
from mmjax.train import trainer

pytestmark = pytest.mark.slow  # Every test here runs on the prepared MNIST copy.

RUNS = {"vqa": "experiments/vqa_mnist.py:smoke", "imagebert": "experiments/imagebert_mnist.py:smoke"}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """Both smoke configs, side by side (start-up is mostly single-threaded), on 2 devices."""
  root = tmp_path_factory.mktemp("smoke")
  procs = {name: subprocess.Popen(lh.launch_cmd(config, root / name), cwd=lh.REPO,
                                  env=lh.env_with_devices(2), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
           for name, config in RUNS.items()}
  for name, p in procs.items():
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"{name}:\n{err[-6000:]}"
  return root


def test_vqa_smoke_run(smoke_runs):
  rows = lh.metrics(smoke_runs / "vqa")
  first, last = rows[0], rows[-1]
  assert last["step"] == 10
  for key in ("train/loss", "train/answer_token_accuracy", "train/answer_accuracy",
              "eval/vqa_exact_match", "eval/vqa_exact_match/cell", "eval/vqa_exact_match/count",
              "eval/vqa_exact_match/presence"):
    assert key in last, key
    assert 0.0 <= last[key] <= (10.0 if key == "train/loss" else 1.0), (key, last[key])
  assert last["train/loss"] < first["train/loss"]
  assert lh.checkpoint_steps(smoke_runs / "vqa") == [5, 10]


def test_imagebert_smoke_run(smoke_runs):
  rows = lh.metrics(smoke_runs / "imagebert")
  first, last = rows[0], rows[-1]
  assert last["step"] == 10
  for key in ("train/itm_loss", "train/mlm_loss", "train/itm_accuracy", "train/mlm_accuracy",
              "eval/itm_accuracy", "eval/itm_loss", "eval/mlm_accuracy"):
    assert key in last, key
  assert 0.0 <= last["eval/itm_accuracy"] <= 1.0
  assert last["train/mlm_loss"] < first["train/mlm_loss"]
  assert lh.checkpoint_steps(smoke_runs / "imagebert") == [5, 10]


def _fake_clip_run(workdir):
  """A checkpoint laid out as the trainer writes a CLIP run's (step 7)."""
  clip = models.CLIP(image_variant="mu/4", image_pool="gap", text_width=16, text_depth=1,
                     text_heads=2, text_mlp_dim=32, max_text_len=8, embed_dim=16)
  params = jax.jit(clip.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                              jnp.zeros((1, 8), jnp.int32))["params"]
  state = trainer.TrainState(step=jnp.array(7), params=params, opt_state={"count": jnp.array(7)},
                             rng=jax.random.PRNGKey(1), extras={})
  mngr = ocp.CheckpointManager(workdir / "checkpoints",
                               options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  mngr.close()
  (workdir / "config.json").write_text(json.dumps({"task": "clip"}))
  return params


def _vqa_config(arg):
  spec = importlib.util.spec_from_file_location("vqa_mnist", lh.REPO / "experiments/vqa_mnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_vqa_vision_starts_from_a_clip_runs_image_tower(tmp_path):
  clip_params = _fake_clip_run(tmp_path)
  config = _vqa_config(f"smoke,clip_workdir={tmp_path}")
  assert config.model.vision_variant == "mu/4" and config.model.image_split == 2
  assert config.frozen == ("vision/.*",)
  task = vqa_task.VqaTask(config, parallel.make_mesh())
  task.setup()
  params, _ = jax.jit(task.init)(jax.random.PRNGKey(0))
  for a, b in zip(jax.tree.leaves(params["vision"]), jax.tree.leaves(clip_params["image_tower"])):
    np.testing.assert_array_equal(a, b)
  config = _vqa_config(f"smoke,clip_workdir={tmp_path}")
  config.model.vision_variant = "mu/7"
  task = vqa_task.VqaTask(config, parallel.make_mesh())
  task.setup()
  with pytest.raises(ValueError, match="variant"):
    jax.jit(task.init)(jax.random.PRNGKey(0))


def test_imagebert_regions_start_from_a_clip_runs_image_tower(tmp_path):
  clip_params = _fake_clip_run(tmp_path)
  spec = importlib.util.spec_from_file_location(
      "imagebert_mnist", lh.REPO / "experiments/imagebert_mnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"smoke,clip_workdir={tmp_path}")
  task = imagebert_task.ImageBertTask(config, parallel.make_mesh())
  task.setup()
  assert task.model.max_len == 2 + 4 + config.max_text_len  # One token per grid cell.
  params, _ = jax.jit(task.init)(jax.random.PRNGKey(0))
  for a, b in zip(jax.tree.leaves(params["vision"]), jax.tree.leaves(clip_params["image_tower"])):
    np.testing.assert_array_equal(a, b)
  config.model.vision_variant = None
  with pytest.raises(ValueError, match="vision_variant"):
    imagebert_task.ImageBertTask(config, parallel.make_mesh())
