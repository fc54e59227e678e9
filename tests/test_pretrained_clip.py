"""config.init_from: zero-shot evaluation and fine-tuning of open_clip weights (no torch).

The weights are the small random open_clip models of tests/fixtures/clip/ (made by
tools/make_interop_fixtures.py), evaluated on MNIST's test[:256] (grey 28-pixel
digits, resized to the model's 32 pixels and repeated to RGB).
"""
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from experiments import clip_mnist
from mmjax import parallel
from mmjax import tasks
from mmjax.train import trainer

import launch_helpers as lh

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "clip"
WEIGHTS = FIXTURES / "quickgelu_p8.safetensors"  # 32x32 images, 16 tokens, vocab 1000.


def _config(**fields):
  c = clip_mnist.get_config("smoke")
  c.init_from = str(WEIGHTS)
  c.quick_gelu = True  # The fixture is a raw open_clip state dict: no metadata.
  c.vision_heads = c.text_heads = 4
  c.dataset.eval_split = "test[:256]"
  c.eval_batch_size = 128
  c.global_batch_size = 16
  c.num_train_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 2
  c.optimizer.learning_rate = 1e-4
  for k, v in fields.items():
    c[k] = v
  return c


@pytest.mark.slow  # Reads the prepared MNIST copy.
def test_eval_only_evaluates_the_loaded_weights(tmp_path):
  config = _config()
  mesh = parallel.make_mesh()
  task = tasks.get_task(config, mesh)
  metrics = trainer.evaluate_only(config, str(tmp_path), task, mesh)
  for key in ("eval/zeroshot_top1", "eval/i2t_recall@1", "eval/t2i_recall@10"):
    assert key in metrics and math.isfinite(metrics[key]), key
  row = json.loads((tmp_path / "eval_only" / "metrics.jsonl").read_text().splitlines()[-1])
  assert row["step"] == 0  # No checkpoint: the loaded parameters, as step 0.

  # The parameters evaluated are the file's: open_clip's embeddings for the fixture's
  # inputs (NHWC images normalised by open_clip, its tokens).
  ref = np.load(FIXTURES / "quickgelu_p8.npz")
  state, _ = trainer.create_train_state(config, task, mesh)  # Placed, not compiled in.
  params = state.params
  jax.tree.map(np.testing.assert_array_equal, params, task.pretrained()[0])
  image_emb, text_emb = task.embed(params, {}, {"image": ref["images_nhwc"],
                                                "tokens": ref["tokens"]})
  np.testing.assert_allclose(image_emb, ref["image_emb"], atol=1e-5)
  np.testing.assert_allclose(text_emb, ref["text_emb"], atol=1e-5)
  assert task.model_image_shape == (32, 32, 3)
  assert task.mean == (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, by default.


@pytest.mark.slow  # Reads the prepared MNIST copy.
def test_class_names_and_templates_come_from_the_config():
  config = _config()
  config.zeroshot.class_names = tuple(f"digit {i}" for i in range(10))
  config.zeroshot.templates = ("a photo of {}.", "{}")
  task = tasks.get_task(config, parallel.make_mesh())
  task.setup()
  emb = task.class_text_embeddings(task.pretrained()[0], {})
  assert emb.shape == (10, 2, 32)


def test_wrong_tokenizer_or_loss_is_a_clear_error():
  config = _config()
  config.tokenizer.kind = "bpe"
  config.tokenizer.vocab = str(FIXTURES / "bpe_simple_vocab_16e6.txt.gz")
  with pytest.raises(ValueError, match="text vocabulary has 1000 entries"):
    tasks.get_task(config, parallel.make_mesh())
  with pytest.raises(ValueError, match="set --config.loss=softmax"):
    tasks.get_task(_config(loss="sigmoid"), parallel.make_mesh())


@pytest.mark.slow  # Reads the prepared MNIST copy.
def test_eval_only_without_checkpoint_or_weights_says_what_to_do(tmp_path):
  config = _config(init_from="")
  mesh = parallel.make_mesh()
  with pytest.raises(FileNotFoundError, match="--config.init_from"):
    trainer.evaluate_only(config, str(tmp_path), tasks.get_task(config, mesh), mesh)


@pytest.mark.slow  # Reads the prepared MNIST copy.
def test_fine_tuning_starts_at_the_loaded_params(tmp_path):
  """launch.py trains 2 steps from the file; --eval_only then reads the checkpoint."""
  args = (f"init_from={WEIGHTS}", "quick_gelu=True", "vision_heads=4", "text_heads=4", "dataset.eval_split=test[:256]", "eval_batch_size=128",
          "global_batch_size=16", "num_train_steps=2", "checkpoint_every_steps=2",
          "eval_every_steps=2", "optimizer.learning_rate=0.0", "optimizer.warmup_steps=0")
  lh.run("experiments/clip_mnist.py:smoke", tmp_path, *args, devices=8)
  from mmjax.interop import open_clip  # pylint: disable=import-outside-toplevel
  from mmjax import runs  # pylint: disable=import-outside-toplevel
  _, loaded = open_clip.load(WEIGHTS, quick_gelu=True, vision_heads=4, text_heads=4)
  run = runs.load_run(str(tmp_path), task="clip")
  # Learning rate 0: the checkpoint holds the loaded parameters exactly.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), loaded)
  rows = lh.metrics(tmp_path)
  assert rows[-1]["step"] == 2 and math.isfinite(rows[-1]["train/loss"])
