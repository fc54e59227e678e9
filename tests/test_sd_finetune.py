"""Fine-tuning a diffusers Stable Diffusion pipeline folder (task "sd") and exporting it back.

The pipelines are the random tiny ones of tests/fixtures/sd_tiny/ (made by
tools/make_sd_fixtures.py; 16x16 images); the data are synthetic (no prepared dataset):
random grey 28x28 digits with labels, or RGB images with captions as
mmjax.data.make_dataset writes them.
"""
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import sd_finetune
from mmjax.data import sources
from mmjax.interop import common
from mmjax.interop import sd_export
from mmjax.interop import sd_pipeline
from mmjax import parallel
from mmjax import tasks
from mmjax.pipelines import stable_diffusion
from mmjax.train import metrics as metrics_lib
from mmjax.train import trainer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "sd_tiny"
SD1 = FIXTURES / "sd1_ddim"  # DDIM, epsilon prediction.
SD2 = FIXTURES / "sd2_euler"  # Euler, v-prediction.
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def _digits(n=256):
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
          "label": rng.integers(0, 10, n).astype(np.int64)}


def _pairs(n=64):
  rng = np.random.default_rng(1)
  words = ("red circle", "blue square", "green triangle")
  return {"image": rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8),
          "caption": np.array([f"a {words[i % 3]}".encode() for i in range(n)], dtype=object),
          "key": np.array([f"{i}".encode() for i in range(n)], dtype=object)}


@pytest.fixture
def data(monkeypatch):
  """Replaces the dataset with synthetic arrays; returns a setter for which ones."""
  arrays = {"value": _digits()}
  monkeypatch.setattr(sources, "load_source",
                      lambda dataset_config, split: sources.ArraySource(arrays["value"]))
  return arrays


@pytest.fixture(scope="module")
def sd1():
  """(config, task set up on the synthetic digits, mesh) of the smoke config on sd1_ddim."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, "load_source",
                  lambda dataset_config, split: sources.ArraySource(_digits()))
    config = _config()
    task, mesh = _task(config)
    task.setup()
  return config, task, mesh


def _config(folder=SD1, arg="smoke", **fields):
  c = sd_finetune.get_config(arg)
  c.init_from = str(folder) if folder else ""
  for k, v in fields.items():
    c[k] = v
  return c


def _task(config):
  mesh = parallel.make_mesh(jax.devices()[:1])
  task = tasks.get_task(config, mesh)
  return task, mesh


def _read(folder, name):
  return common.read_safetensors(pathlib.Path(folder) / name)[0]


def test_init_from_is_required_and_the_vae_must_stay_frozen(data):
  with pytest.raises(ValueError, match=r"config.init_from is empty.*--config.init_from="):
    _task(_config(None))
  with pytest.raises(common.CheckpointError, match="not a pipeline: no model_index.json"):
    _task(_config(SD1 / "vae"))
  task, _ = _task(_config(frozen=("text_encoder/.*",)))
  with pytest.raises(ValueError, match=r"leaves VAE parameters trained.*Add 'vae/\.\*'"):
    task.setup()
  with pytest.raises(ValueError, match="config.captions='data' needs config.sampling.prompts"):
    c = _config(arg="smoke,name=my_pairs")
    c.sampling.prompts = ()
    _task(c)


def test_the_state_starts_at_the_folders_weights_and_exports_them_unchanged(sd1, tmp_path):
  """Step 0: the U-Net, text encoder and VAE are the folder's; VAE and text encoder frozen;
  exporting those parameters writes the source files' tensors exactly."""
  config, task, mesh = sd1
  state, opt = trainer.create_train_state(config, task, mesh)
  params = jax.device_get(state.params)
  _, unet, _ = sd_pipeline.load_unet(SD1 / "unet")
  _, text, _ = sd_pipeline.load_text_encoder(SD1 / "text_encoder")
  _, vae, _ = sd_pipeline.load_vae(SD1 / "vae")
  for got, want in ((params["unet"], unet), (params["text_encoder"], text),
                    (params["vae"], vae)):
    jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not any(jax.tree.leaves(opt.frozen["unet"]))
  assert all(jax.tree.leaves(opt.frozen["text_encoder"]) + jax.tree.leaves(opt.frozen["vae"]))

  out = sd_export.export_pipeline(SD1, tmp_path / "exported", params)
  for name in WEIGHT_FILES:
    src, new = _read(SD1, name), _read(out, name)
    assert src.keys() == new.keys()
    for k in src:
      assert new[k].dtype == src[k].dtype
      np.testing.assert_array_equal(new[k], src[k], err_msg=f"{name}: {k}")
  with pytest.raises(FileExistsError, match="exists"):
    sd_export.export_pipeline(SD1, out, params)


def test_batches_templated_and_from_captions(sd1, data):
  """Grey 28x28 digits -> RGB 16x16 in [-1, 1] with templated captions; make_dataset-style
  RGB pairs -> their own captions; both tokenized by the folder's tokenizer (77 ids)."""
  _, task, _ = sd1
  assert task.image_size == 16 and task.prediction_type == "eps"
  batch = task.train_preprocess({**sources.gather(task.train_source, np.arange(8)),
                                 "position": np.arange(8)})
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # Grey.
  labels = task.train_source.arrays["label"][:8]
  texts = task.texts({"label": labels, "position": np.arange(8)}, train=False)
  assert all(t and task.class_names[y] in t for t, y in zip(texts, labels))
  assert batch["tokens"].shape == (8, 77)
  eval_batch = task.eval_preprocess({**sources.gather(task.train_source, np.arange(8)),
                                     "position": np.arange(8)})
  np.testing.assert_array_equal(eval_batch["tokens"], task.pipe.tokenizer.encode(texts))

  data["value"] = _pairs()
  c = _config(SD2, arg="smoke,name=my_pairs")
  c.diffusion.cond_drop_prob = 0.0
  task, _ = _task(c)
  task.setup()
  assert task.prediction_type == "v"  # sd2_euler's scheduler: v_prediction.
  batch = task.train_preprocess({**sources.gather(task.train_source, np.arange(6)),
                                 "position": np.arange(6)})
  assert batch["image"].shape == (6, 16, 16, 3)
  want = [f"a {w}" for w in ("red circle", "blue square", "green triangle")] * 2
  np.testing.assert_array_equal(batch["tokens"], task.pipe.tokenizer.encode(want))
  assert task.prompts([0, 2]) == list(c.sampling.prompts[:3:2])


@pytest.mark.slow  # Compiles the train step and the sampling loop: about a minute.
def test_smoke_run_trains_only_the_unet_writes_samples_and_exports(data, tmp_path):
  config = _config()
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 3, 3, 3
  task, mesh = _task(config)
  workdir = tmp_path / "run"
  final = trainer.train_and_evaluate(config, str(workdir), task, mesh)
  rows = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
  assert rows[-1]["step"] == 3 and all(np.isfinite(r["train/loss"]) for r in rows
                                       if "train/loss" in r)
  assert np.isfinite(final["train/loss"])

  from mmjax import runs  # pylint: disable=import-outside-toplevel
  run = runs.load_run(str(workdir), task="sd")
  params = jax.device_get(run.params)
  _, unet, _ = sd_pipeline.load_unet(SD1 / "unet")
  _, text, _ = sd_pipeline.load_text_encoder(SD1 / "text_encoder")
  _, vae, _ = sd_pipeline.load_vae(SD1 / "vae")
  jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], text)
  jax.tree.map(np.testing.assert_array_equal, params["vae"], vae)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["unet"]),
                                                       jax.tree.leaves(unet))]
  assert sum(changed) > 0.9 * len(changed)

  # Samples: one 2-image row per digit prompt at guidance 3.
  image = np.asarray(Image.open(workdir / "images" / "samples_guidance_3_3.png"))
  assert image.shape == (10 * 16, 2 * 16, 3) and image.std() > 0

  out = tmp_path / "exported"
  assert sd_export.main([f"--workdir={workdir}", f"--out={out}"]) == 0
  exported = stable_diffusion.StableDiffusion.from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, exported.unet_params, params["unet"])
  jax.tree.map(np.testing.assert_array_equal, exported.text_params, text)
  src, new = _read(SD1, WEIGHT_FILES[0]), _read(out, WEIGHT_FILES[0])
  assert src.keys() == new.keys() and any(not np.array_equal(src[k], new[k]) for k in src)


@pytest.mark.slow  # Compiles the train step: about half a minute.
def test_lora_run_exports_the_merged_unet_and_keeps_the_base(data, tmp_path):
  """U-Net LoRA on a diffusers folder: the base stays as loaded, sd_export writes the
  adapters merged into the kernels (the merged U-Net is what the folder then holds)."""
  config = _config()
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 2, 2, 100
  config.lora = dict(rank=2, alpha=4.0, targets=("unet/.*/(to_q|to_k|to_v|to_out_0)/kernel",),
                     dropout=0.0, train=())
  config.optimizer.learning_rate = 1e-2
  task, mesh = _task(config)
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir), task, mesh)

  from mmjax import lora  # pylint: disable=import-outside-toplevel
  from mmjax import runs  # pylint: disable=import-outside-toplevel
  run = runs.load_run(str(workdir), task="sd")
  _, unet, _ = sd_pipeline.load_unet(SD1 / "unet")
  params = jax.device_get(run.params)
  jax.tree.map(np.testing.assert_array_equal, lora.strip(params)["unet"], unet)
  assert any(np.any(b != 0) for b in jax.tree.leaves(lora.adapters(params)))
  merged = jax.device_get(run.merged())["unet"]
  out = tmp_path / "exported"
  assert sd_export.main([f"--workdir={workdir}", f"--out={out}"]) == 0
  exported = stable_diffusion.StableDiffusion.from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, exported.unet_params, merged)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged),
                                                      jax.tree.leaves(unet)))
  # The adapters alone, as a diffusers LoRA file: the pipeline with it is the run's.
  assert sd_export.main([f"--workdir={workdir}", f"--out={tmp_path / 'lora'}", "--lora"]) == 0
  with_lora = stable_diffusion.StableDiffusion.from_pretrained(SD1).with_lora(tmp_path / "lora")
  jax.tree.map(np.testing.assert_array_equal, with_lora.unet_params, merged)
