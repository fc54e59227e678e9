"""Every experiment's config, task and evaluators end to end on synthetic data, in-process.

No prepared dataset is needed (as the Flax examples test on mock data): the data source
is replaced by 512 random 28x28 digits with labels, and each experiment's smoke config
trains a few steps on one device, checkpoints, and evaluates. The same runs on the real
MNIST copy are the `slow` end-to-end tests.
"""
import importlib.util

import jax
import numpy as np
import pytest

from mmjax import tasks
from mmjax.data import pipeline
from mmjax.train import metrics as metrics_lib
from mmjax.train import sharding
from mmjax.train import trainer

import launch_helpers as lh


@pytest.fixture(autouse=True)
def synthetic_mnist(monkeypatch):
  rng = np.random.default_rng(0)
  arrays = {"image": rng.integers(0, 256, (512, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, 512).astype(np.int64)}

  def load_source(dataset_config, split):
    return pipeline.ArraySource(arrays)

  monkeypatch.setattr(pipeline, "load_source", load_source)


def _config(name, arg):
  spec = importlib.util.spec_from_file_location(name, lh.REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _run(config, workdir):
  mesh = sharding.make_mesh(jax.devices()[:1])
  final = trainer.train_and_evaluate(config, str(workdir), tasks.get_task(config, mesh), mesh)
  rows = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
  assert rows[-1]["step"] == config.num_train_steps
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  return final


@pytest.mark.parametrize("name, arg, key", [
    ("mnist_lenet", "smoke", "eval/accuracy"),
    ("clip_mnist", "smoke", "eval/zeroshot_top1"),
    ("clip_mnist", "smoke,loss=sigmoid", "eval/i2t_recall@5"),
    ("vqa_mnist", "smoke", "eval/vqa_exact_match/count"),
    ("imagebert_mnist", "smoke", "eval/itm_accuracy"),
])
def test_experiment_on_synthetic_data(tmp_path, name, arg, key):
  config = _config(name, arg)
  config.num_train_steps, config.checkpoint_every_steps = 4, 2
  final = _run(config, tmp_path)
  assert 0.0 <= final[key] <= 1.0


def test_latent_diffusion_stages_on_synthetic_data(tmp_path):
  config = _config("ldm_mnist", "smoke,stage=autoencoder")
  config.num_train_steps, config.checkpoint_every_steps = 4, 2
  assert 0.0 < _run(config, tmp_path / "ae")["eval/recon_mse"] < 1.0
  assert (tmp_path / "ae" / "images" / "reconstructions_4.png").exists()
  config = _config("ldm_mnist", "smoke,stage=diffusion")
  config.num_train_steps, config.checkpoint_every_steps = 4, 2
  config.autoencoder_workdir = str(tmp_path / "ae")
  config.evals.samples.update(classifier_workdir="", samples_per_class=1, guidance_scales=(2.0,))
  _run(config, tmp_path / "ldm")
  assert (tmp_path / "ldm" / "images" / "samples_guidance_2_4.png").exists()
