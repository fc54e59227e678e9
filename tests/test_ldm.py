"""Latent diffusion experiment: Fréchet distance, grids, caption dropout, both stages end to end."""
import math
import re
import subprocess

import jax
import numpy as np
import PIL.Image
import pytest
import scipy.linalg

import launch_helpers as lh
from mmjax import lora
from mmjax import runs
from mmjax.evals import generative


def test_frechet_distance_matches_the_matrix_square_root_formula():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
  b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
  mu_a, cov_a = a.mean(0), np.cov(a, rowvar=False)
  mu_b, cov_b = b.mean(0), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
  expected = np.sum((mu_a - mu_b)**2) + np.trace(cov_a + cov_b - 2 * covmean)
  assert generative.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
  assert generative.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
  # 1-D Gaussians: (m1 − m2)² + (s1 − s2)².
  x, y = rng.normal(1.0, 2.0, size=(200_000, 1)), rng.normal(-1.0, 0.5, size=(200_000, 1))
  assert generative.frechet_distance(x, y) == pytest.approx(4.0 + 1.5**2, rel=1e-2)
  with pytest.raises(ValueError, match="dim"):
    generative.frechet_distance(np.zeros(5), np.zeros(5))


def test_image_grid_puts_each_row_of_images_on_one_row():
  images = np.zeros((6, 2, 3, 1))
  for i in range(6):
    images[i] = i / 10
  grid = generative.image_grid(images, rows=2)
  assert grid.shape == (1, 4, 9, 1) and grid.dtype == np.uint8
  assert grid[0, 0, 3, 0] == int(0.1 * 255 + 0.5) and grid[0, 2, 0, 0] == int(0.3 * 255 + 0.5)
  with pytest.raises(ValueError, match="rows"):
    generative.image_grid(images, rows=4)


@pytest.mark.slow
def test_diffusion_stage_without_an_autoencoder_fails_with_the_command(tmp_path):
  proc = lh.run("experiments/ldm_mnist.py:smoke,stage=diffusion", tmp_path / "ldm",
                f"autoencoder_workdir={tmp_path / 'missing'}", check=False, timeout=120)
  assert proc.returncode != 0
  assert "autoencoder_workdir" in proc.stderr and "Train that run first" in proc.stderr


@pytest.mark.slow
def test_both_stages_smoke_run(tmp_path):
  """LeNet judge, autoencoder, then diffusion reading both, data-parallel on 2 fake devices.

  (2, not 8: sharded all the same, and on a 2-core CPU about a third faster.)
  """
  judge, ae, ldm = tmp_path / "judge", tmp_path / "ae", tmp_path / "ldm"
  # The judge trains side by side with the autoencoder (start-up is mostly one thread).
  judging = subprocess.Popen(lh.launch_cmd("experiments/mnist_lenet.py:smoke", judge),
                             cwd=lh.REPO, env=lh.env_with_devices(2),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lh.run("experiments/ldm_mnist.py:smoke,stage=autoencoder", ae, devices=2)
  _, err = judging.communicate(timeout=300)
  assert judging.returncode == 0, err[-6000:]
  rows = lh.metrics(ae)
  assert rows[-1]["train/recon_mse"] < rows[0]["train/recon_mse"]
  assert 0.0 < rows[-1]["eval/recon_mse"] < 0.5
  assert (ae / "images" / "reconstructions_20.png").exists()

  lh.run("experiments/ldm_mnist.py:smoke,stage=diffusion", ldm, f"autoencoder_workdir={ae}",
         f"evals.samples.classifier_workdir={judge}", devices=2)
  rows = lh.metrics(ldm)
  last = rows[-1]
  assert last["step"] == 20 and lh.checkpoint_steps(ldm) == [10, 20]
  assert last["train/loss"] < rows[0]["train/loss"]
  for g in ("0", "1", "2", "4"):
    assert 0.0 <= last[f"eval/sample_accuracy/guidance_{g}"] <= 1.0
    # Twenty steps in, samples are far from digits; real train vs test images are close.
    assert last[f"eval/fld/guidance_{g}"] > last["eval/fld_reference"] >= 0.0
    grid = PIL.Image.open(ldm / "images" / f"samples_guidance_{g}_20.png")
    assert grid.size == (4 * 28, 10 * 28)  # A row of 4 samples per digit.
  best = last["eval/best_guidance"]
  assert last["eval/sample_accuracy"] == last[f"eval/sample_accuracy/guidance_{best:g}"]
  assert math.isfinite(last["eval/fld"])

  # LoRA on Fashion-MNIST captions from the diffusion run's EMA: the adapters train, the
  # EMA averages them and keeps the base, so without the adapters it is the MNIST EMA.
  adapted = tmp_path / "ldm_lora"
  proc = lh.run(f"experiments/ldm_lora.py:smoke,ldm_workdir={ldm}", adapted,
         f"autoencoder_workdir={ae}", f"evals.samples.classifier_workdir={judge}",
         "num_train_steps=6", "checkpoint_every_steps=6", "eval_every_steps=6",
         "evals.samples.guidance_scales=(2.0,)", devices=2)
  assert re.search(r"Training [\d,]+ of [\d,]+ parameters \(\d+\.\d\d%\)", proc.stderr)
  row = lh.metrics(adapted)[-1]
  assert row["step"] == 6 and 0.0 <= row["eval/sample_accuracy/guidance_2"] <= 1.0
  base, run = runs.load_run(str(ldm)), runs.load_run(str(adapted))
  ema = run.extras["ema"]
  assert lora.has_adapters(ema) and lora.has_adapters(run.params)
  assert any(np.any(b != 0) for b in jax.tree.leaves(lora.adapters(ema)))
  equal = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert equal(lora.strip(ema), base.extras["ema"])  # The MNIST model, bit for bit.
  assert equal(lora.strip(run.params), base.extras["ema"])
  scale = lora.spec_from_config(run.config).scale
  assert not equal(lora.merge(ema, scale), base.extras["ema"])


def test_ema_warms_up_then_follows_the_decay():
  import types
  import jax.numpy as jnp
  from mmjax.tasks import ldm
  from mmjax.train import trainer
  fake = types.SimpleNamespace(config=types.SimpleNamespace(
      diffusion=types.SimpleNamespace(ema_decay=0.9)))
  state = trainer.TrainState(step=jnp.asarray(0), params={"w": jnp.ones(3)}, opt_state=(),
                             rng=None, extras={"ema": {"w": jnp.zeros(3)}})
  # Step 0: decay min(0.9, 1/10) = 0.1, so the EMA moves 90% of the way.
  out = ldm.LatentDiffusionTask.after_update(fake, state)
  np.testing.assert_allclose(out.extras["ema"]["w"], 0.9, rtol=1e-6)
  out = ldm.LatentDiffusionTask.after_update(fake, state.replace(step=jnp.asarray(10_000)))
  np.testing.assert_allclose(out.extras["ema"]["w"], 0.1, rtol=1e-5)
