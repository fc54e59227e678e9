"""config.init_from=<Hugging Face folder>: evaluation (zero-shot, linear probe, k-shot) and
fine-tuning of CLIPModel / SiglipModel weights, on MNIST slices (no torch).

The folders are the small random models of tests/fixtures/hf_clip/ (made by
tools/make_hf_fixtures.py); MNIST's grey 28-pixel digits are resized to their 32 pixels
and repeated to RGB.
"""
import math
import pathlib

import jax
import numpy as np
import pytest

from experiments import clip_mnist
from mmjax import tasks
from mmjax.interop import hf_tokenizer
from mmjax.interop import load_pretrained
from mmjax import parallel
from mmjax.train import trainer

import launch_helpers as lh

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_clip"
CLIP = FIXTURES / "clip_quickgelu_p8"  # 32x32 images, 16 tokens, its own tokenizer.
SIGLIP = FIXTURES / "siglip_p8"  # 32x32 images, 12 tokens, vocabulary 300, no tokenizer.


def _config(init_from, **fields):
  c = clip_mnist.get_config("smoke")
  c.init_from = str(init_from)
  c.dataset.train_split = "train[:500]"
  c.dataset.eval_split = "test[:256]"
  c.eval_batch_size = 128
  c.global_batch_size = 16
  c.zeroshot.template_set = "simple_imagenet"
  for k, v in fields.items():
    c[k] = v
  return c


@pytest.mark.slow  # Reads the prepared MNIST copy.
def test_eval_only_runs_every_evaluator_on_a_hf_clip_folder(tmp_path):
  config = _config(CLIP)
  config.evals.probe = dict(type="linear_probe", l2_grid=(1e-3, 1e-1), steps=50)
  config.evals.kshot = dict(type="fewshot", shots=(1, 5), seeds=3)
  mesh = parallel.make_mesh()
  task = tasks.get_task(config, mesh)
  assert isinstance(task.tokenizer, hf_tokenizer.PretrainedTokenizer)  # kind "auto".
  assert len(task.eval_templates) == 7
  metrics = trainer.evaluate_only(config, str(tmp_path), task, mesh)
  for key in ("eval/zeroshot_top1", "eval/i2t_recall@1", "eval/linear_probe_top1",
              "eval/1shot_top1", "eval/5shot_top1"):
    assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
  assert metrics["eval/linear_probe_l2"] in (1e-3, 1e-1)
  # Random weights, but the probe learns from 450 examples what chance (0.1) cannot.
  assert metrics["eval/linear_probe_top1"] > 0.3
  # The evaluated parameters are the folder's: transformers' embeddings.
  ref = np.load(FIXTURES / "clip_quickgelu_p8.npz")
  state, _ = trainer.create_train_state(config, task, mesh)
  image_emb, text_emb = task.embed(state.params, {}, {"image": ref["images_nhwc"],
                                                      "tokens": ref["tokens"]})
  np.testing.assert_allclose(image_emb, ref["image_emb"], atol=1e-5)
  np.testing.assert_allclose(text_emb, ref["text_emb"], atol=1e-5)


def test_a_siglip_folder_needs_the_sigmoid_loss_and_a_tokenizer():
  with pytest.raises(ValueError, match="set --config.loss=sigmoid"):
    tasks.get_task(_config(SIGLIP), parallel.make_mesh())
  with pytest.raises(ValueError, match="no tokenizer mmjax reads.*tokenizer.kind=byte"):
    tasks.get_task(_config(SIGLIP, loss="sigmoid"), parallel.make_mesh())
  with pytest.raises(ValueError, match="kind='pretrained' reads a Hugging Face folder"):
    c = _config("", loss="sigmoid")
    c.tokenizer.kind = "pretrained"
    tasks.get_task(c, parallel.make_mesh())


@pytest.mark.slow  # Reads the prepared MNIST copy.
def test_fine_tuning_a_siglip_folder_starts_at_its_params(tmp_path):
  """launch.py trains 2 steps from the folder (learning rate 0: the checkpoint holds the
  folder's parameters exactly) and evaluates them."""
  args = (f"init_from={SIGLIP}", "loss=sigmoid", "tokenizer.kind=byte",
          "dataset.eval_split=test[:256]", "eval_batch_size=128", "global_batch_size=16",
          "num_train_steps=2", "checkpoint_every_steps=2", "eval_every_steps=2",
          "optimizer.learning_rate=0.0", "optimizer.warmup_steps=0")
  lh.run("experiments/clip_mnist.py:smoke", tmp_path, *args, devices=2)
  from mmjax import runs  # pylint: disable=import-outside-toplevel
  run = runs.load_run(str(tmp_path), task="clip")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params),
               load_pretrained(SIGLIP).params)
  rows = lh.metrics(tmp_path)
  assert rows[-1]["step"] == 2 and math.isfinite(rows[-1]["train/loss"])
  assert math.isfinite(rows[-1]["eval/zeroshot_top1"])
