"""The CLIP experiment end to end: smoke run on 8 fake devices, both losses."""
import math

import pytest

import launch_helpers as lh

pytestmark = pytest.mark.slow  # Runs on the prepared MNIST copy.


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_clip_smoke_run(tmp_path, loss):
  lh.run(f"experiments/clip_mnist.py:smoke,loss={loss}", tmp_path, devices=8)
  rows = lh.metrics(tmp_path)
  first, last = rows[0], rows[-1]
  assert last["step"] == 20
  for key in ("train/loss", "train/temperature", "train/contrastive_accuracy",
              "eval/zeroshot_top1", "eval/i2t_recall@1", "eval/i2t_recall@5",
              "eval/i2t_recall@10", "eval/t2i_recall@1", "eval/t2i_recall@10"):
    assert key in last, key
  if loss == "softmax":
    # At initialisation the embeddings are uninformative: the loss is near log(batch).
    assert abs(first["train/loss"] - math.log(32)) < 0.5
    assert last["train/temperature"] == pytest.approx(0.07, rel=0.1)
  assert last["train/loss"] < first["train/loss"]
  assert 0.0 <= last["eval/zeroshot_top1"] <= 1.0
  assert last["eval/i2t_recall@1"] <= last["eval/i2t_recall@5"] <= last["eval/i2t_recall@10"]
  assert lh.checkpoint_steps(tmp_path) == [10, 20]
