"""experiments/clip_lora.py: the config resolves, its adapters sit on the attention
projections of both CLIP towers and train at most 5% of the parameters; end to end on
synthetic data, only the adapters change and the optimizer state is a few percent of
full training's (tools/checkpoint_bytes.py)."""
import importlib.util

import jax
import numpy as np
import pytest

from mmjax import lora
from mmjax import parallel
from mmjax import runs
from mmjax import tasks
from mmjax.train import trainer

import launch_helpers as lh
from test_experiments_mock import _config, synthetic_mnist  # pylint: disable=unused-import


def _tool():
  path = lh.REPO / "tools" / "checkpoint_bytes.py"
  spec = importlib.util.spec_from_file_location("checkpoint_bytes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _adapted_kernels(config):
  task = tasks.get_task(config, parallel.make_mesh(jax.devices()[:1]))
  task.setup()  # On the synthetic 28x28 digits: the model is the real config's.
  params = jax.eval_shape(task.init, jax.random.PRNGKey(0))[0]
  return lora.target_kernels(params, task.spec), lora.count(params)


def test_config_and_smoke_resolve():
  full = _config("clip_lora", "clip_workdir=workdirs/clip_mnist")
  smoke = _config("clip_lora", "smoke,clip_workdir=/tmp/clip_smoke")
  for c in (full, smoke):
    assert c.dataset.name == "fashion_mnist" and c.task == "clip"
    assert 1 <= c.lora.rank <= 16 and c.lora.dropout == 0.0
  assert full.warm_start.workdir == "workdirs/clip_mnist"
  assert smoke.num_train_steps < full.num_train_steps
  with pytest.raises(ValueError, match="targets='all'"):
    _config("clip_lora", "targets=all")


ATTENTION, MLP = ("query", "key", "value", "out"), ("fc1", "fc2")


@pytest.mark.parametrize("arg, per_layer, outside", [
    ("", ATTENTION, ()),
    ("targets=attention_mlp,rank=2", ATTENTION + MLP, ()),
    ("targets=attention_mlp_proj,rank=2", ATTENTION + MLP, ("image_proj", "text_proj")),
])
def test_adapters_on_both_towers_train_at_most_5_percent(arg, per_layer, outside):
  kernels, (adapter, total) = _adapted_kernels(_config("clip_lora", arg))
  # mu/4 image tower: 2 blocks; text tower: 1 block.
  expected = {f"{tower}_tower/encoder/block{i}/{'mlp' if m in MLP else 'attention'}/{m}/kernel"
              for tower, depth in (("image", 2), ("text", 1)) for i in range(depth)
              for m in per_layer}
  assert set(kernels) == expected | {f"{p}/kernel" for p in outside}
  assert 0 < adapter <= 0.05 * total


@pytest.mark.slow
def test_only_adapters_train_and_the_optimizer_state_is_small(tmp_path):
  mesh = parallel.make_mesh(jax.devices()[:1])
  run = lambda c, w: trainer.train_and_evaluate(c, str(w), tasks.get_task(c, mesh), mesh)
  clip = _config("clip_mnist", "smoke")
  clip.num_train_steps, clip.checkpoint_every_steps = 2, 2
  run(clip, tmp_path / "clip")
  adapted = _config("clip_lora", f"smoke,clip_workdir={tmp_path / 'clip'}")
  adapted.num_train_steps, adapted.checkpoint_every_steps = 2, 2
  final = run(adapted, tmp_path / "lora")
  assert 0.0 <= final["eval/zeroshot_top1"] <= 1.0
  source = runs.load_run(str(tmp_path / "clip")).params
  after = runs.load_run(str(tmp_path / "lora")).params
  jax.tree.map(np.testing.assert_array_equal, lora.strip(after), source)
  b = jax.tree.leaves(lora.adapters(after)["image_tower"])
  assert any(np.any(x != 0) for x in b)  # lora_b started at 0 and trained.

  tool = _tool()
  full, low = tool.checkpoint_bytes(tmp_path / "clip"), tool.checkpoint_bytes(tmp_path / "lora")
  n_adapter, n_all = lora.count(after)
  assert full["params"] == 4 * (n_all - n_adapter) and full["adapters"] == 0
  assert low["adapters"] == 4 * n_adapter and low["params"] == 4 * n_all
  # Adam's two moments (float32) of the trained leaves, plus a few step counters.
  assert 2 * full["params"] <= full["opt_state"] < 2 * full["params"] + 64
  assert 2 * low["adapters"] <= low["opt_state"] < 2 * low["adapters"] + 64
  assert low["opt_state"] <= 0.05 * full["opt_state"]
