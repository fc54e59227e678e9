"""Latent diffusion in two stages: a KL autoencoder, then a text-conditioned U-Net.

Stage 1 (`task="autoencoder"`) trains `AutoencoderKL` on images scaled to [-1, 1].
Stage 2 (`task="ldm"`) reads that autoencoder from `config.autoencoder_workdir`,
encodes the training split to latents once, and trains a U-Net (with a small text
Transformer, or the frozen text tower of a CLIP run) to denoise them, conditioned on
"a handwritten digit seven" and the like; the caption is dropped to "" with
probability `config.diffusion.cond_drop_prob` for classifier-free guidance. An EMA of
the weights is kept in the train state's extras and used for sampling. Samples are
judged by the classifier trained in `config.classifier_workdir` (the MNIST LeNet-5
experiment): accuracy against the prompt's digit and Fréchet distance in its
84-unit feature space.
"""
import functools
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import diffusion
from mmjax.data import captions
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evals import common
from mmjax.evals import generative
from mmjax.models import autoencoder as ae_lib
from mmjax.models.text import TextTransformer
from mmjax.models.unet import UNet
from mmjax.tasks.classify import MODELS as CLASSIFIERS
from mmjax.tasks.classify import NORMALISATION
from mmjax.train import sharding as sharding_lib
from mmjax.train import trainer

IMAGE_SHAPE = (28, 28, 1)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [b, h, w, c] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def _module_kwargs(d) -> dict:
  """Config dict -> module fields; JSON lists back to the tuples linen fields expect."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d).items()}


def _read_run(workdir: str, task: str, field: str) -> tuple[dict, dict]:
  """(config.json as a dict, saved train state) of an earlier run of `task`."""
  path = os.path.join(workdir, "config.json")
  if not workdir or not os.path.exists(path):
    raise FileNotFoundError(
        f"config.{field}={workdir!r} holds no finished run (no {path}). Train that "
        f"stage first (see experiments/ldm_mnist.py's docstring) or point {field} at it.")
  with open(path) as f:
    config = json.load(f)
  if config.get("task") != task:
    raise ValueError(f"config.{field}={workdir!r} is a {config.get('task')!r} run; "
                     f"a {task!r} run is needed here.")
  return config, trainer.restore_state(workdir)


class AutoencoderTask:
  """Stage 1: images -> 8x8 latents -> images, L1 (or L2) + a small KL weight."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    self.config = config
    self.mesh = mesh
    self.model = ae_lib.AutoencoderKL(**_module_kwargs(config.model))
    self.train_source = pipeline.load_source(config.dataset, config.dataset.train_split)
    self.eval_source = pipeline.load_source(config.dataset, config.dataset.eval_split)
    self._eval_sums = jax.jit(self._batch_sums)
    self._reconstruct = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0])

  def _preprocess(self, batch):
    return {"image": to_unit_range(batch["image"])}

  def train_dataset(self, sharding: pipeline.Sharding):
    return pipeline.train_dataset(self.train_source, global_batch_size=self.config.global_batch_size,
                                  seed=self.config.seed, preprocess=self._preprocess,
                                  sharding=sharding)

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1, *IMAGE_SHAPE)))["params"], {}

  def weight_decay_mask(self, params):
    return None

  def loss(self, params, extras, batch, rng):
    x = batch["image"]
    recon, mean, logvar = self.model.apply({"params": params}, x, rng)
    loss = ae_lib.autoencoder_loss(recon, x, mean, logvar, self.config.kl_weight,
                                   self.config.reconstruction_loss)
    # Pixels in [-1, 1]: a quarter of the squared error is the error in [0, 1] units.
    mse = jnp.mean(jnp.square(recon - x)) / 4
    return jnp.mean(loss), ({"train/recon_mse": mse,
                             "train/kl": jnp.mean(ae_lib.kl_divergence(mean, logvar))}, extras)

  def _batch_sums(self, params, batch):
    x, mask = batch["image"], batch["mask"]
    recon, mean, logvar = self.model.apply({"params": params}, x)  # Posterior mean.
    mse = jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - x), axis=(1, 2, 3)) / 4
    return {"recon_mse": jnp.sum(mse * mask),
            "kl": jnp.sum(ae_lib.kl_divergence(mean, logvar) * mask),
            "latent_sq": jnp.sum(jnp.mean(jnp.square(mean), axis=(1, 2, 3)) * mask),
            "count": jnp.sum(mask)}

  def evaluate(self, state) -> dict:
    dataset = pipeline.eval_dataset(
        self.eval_source, global_batch_size=self.config.eval_batch_size,
        preprocess=self._preprocess,
        sharding=pipeline.Sharding(jax.process_index(), jax.process_count()))
    metrics = common.means(common.sum_over_batches(
        functools.partial(self._eval_sums, state.params), dataset, self.mesh))
    metrics["eval/latent_rms"] = float(np.sqrt(metrics.pop("eval/latent_sq")))
    # Eight test digits over their reconstructions.
    x = to_unit_range(pipeline.gather(self.eval_source, np.arange(8))["image"])
    recon = self._reconstruct(jax.device_get(state.params), x)
    pair = np.concatenate([x, np.asarray(recon)]) * 0.5 + 0.5
    metrics["reconstructions"] = generative.image_grid(pair, rows=2)
    return metrics


class LatentDiffusionTask:
  """Stage 2: a U-Net denoising autoencoder latents, conditioned on captions."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    captions.check_dataset(config.dataset.name)
    self.config = config
    self.mesh = mesh
    s = config.sampling
    self.num_samples = len(captions.CLASS_NAMES[config.dataset.name]) * s.samples_per_class
    sharding_lib.check_batch_size(self.num_samples, mesh, "sampling.samples_per_class x 10")
    self.repl = sharding_lib.replicated(mesh)

    # The first stage, and the judge (optional: without it, no accuracy or FLD).
    ae_config, ae_state = _read_run(config.autoencoder_workdir, "autoencoder",
                                    "autoencoder_workdir")
    self.autoencoder = ae_lib.AutoencoderKL(**_module_kwargs(ae_config["model"]))
    self.ae_params = jax.device_put(ae_state["params"], self.repl)
    self.judge = None
    if config.classifier_workdir:
      clf_config, clf_state = _read_run(config.classifier_workdir, "classify",
                                        "classifier_workdir")
      if clf_config["model"] != "lenet5":
        raise ValueError(f"config.classifier_workdir must hold a LeNet-5 run (its 84-unit "
                         f"layer is the FLD feature space); it holds {clf_config['model']!r}.")
      self.judge = CLASSIFIERS["lenet5"]()
      self.judge_params = jax.device_put(clf_state["params"], self.repl)

    # Text: a small Transformer trained with the U-Net, or a CLIP run's frozen tower.
    if config.clip_workdir:
      clip_config, clip_state = _read_run(config.clip_workdir, "clip", "clip_workdir")
      m = clip_config["model"]
      self.text_encoder = TextTransformer(m["text_width"], m["text_depth"], m["text_heads"],
                                          m["text_mlp_dim"], max_len=m["max_text_len"])
      self.frozen_text = jax.device_put(clip_state["params"]["text_tower"], self.repl)
    else:
      self.text_encoder = TextTransformer(**_module_kwargs(config.text))
      self.frozen_text = None
    self.tokenizer = tokenizer_lib.ByteTokenizer(max_len=self.text_encoder.max_len)
    self.unet = UNet(**_module_kwargs(config.unet), context_dim=self.text_encoder.width)

    d = config.diffusion
    self.schedule = diffusion.make_schedule(d.schedule, d.num_timesteps)
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    self.train_source = self._encode_split(config.dataset.train_split)
    self.latent_shape = self.train_source.arrays["mean"].shape[1:]
    self.latent_scale = self._latent_scale()
    logging.info("Latents %s, scale factor %.4f (1 / std of the %d training latents).",
                 self.latent_shape, self.latent_scale, len(self.train_source))
    self.eval_source = pipeline.load_source(config.dataset, config.dataset.eval_split)
    self.sampler = diffusion.make_sampler(
        lambda v, x, t, c: self.unet.apply(v, x, t, c), self.schedule, self.latent_shape,
        num_steps=s.num_steps, method=s.method, eta=s.eta, prediction_type=d.prediction_type)
    self._context = jax.jit(self.context, out_shardings=sharding_lib.batch_sharded(mesh))
    self._uncond_context = jax.jit(self.context, out_shardings=self.repl)
    self._judge = jax.jit(self._judge_fn, out_shardings=self.repl)
    self._test_features = None

  # Data: the training split's posterior moments, computed once per run.
  def _encode_split(self, split: str) -> pipeline.ArraySource:
    images = pipeline.load_source(self.config.dataset, split)
    arrays = images.arrays if isinstance(images, pipeline.ArraySource) else None
    if arrays is None:
      raise ValueError("The diffusion stage needs config.dataset.cache_decoded = True.")
    encode = jax.jit(lambda p, x: self.autoencoder.apply({"params": p}, x,
                                                         method=self.autoencoder.encode))
    params = jax.device_get(self.ae_params)
    means, logvars = [], []
    for i in range(0, len(images), 2000):
      mean, logvar = encode(params, jnp.asarray(to_unit_range(arrays["image"][i:i + 2000])))
      means.append(np.asarray(mean))
      logvars.append(np.asarray(logvar))
    return pipeline.ArraySource({"mean": np.concatenate(means),
                                 "logvar": np.concatenate(logvars),
                                 "label": arrays["label"].astype(np.int32)})

  def _latent_scale(self) -> float:
    """1 / std of posterior samples of the training latents (fixed noise seed)."""
    a = self.train_source.arrays
    noise = np.random.default_rng(0).standard_normal(a["mean"].shape, np.float32)
    return ae_lib.latent_scale_factor(a["mean"] + np.exp(0.5 * a["logvar"]) * noise)

  def prompts(self, labels) -> list[str]:
    return [self.config.prompt.format(self.class_names[y]) for y in np.asarray(labels).tolist()]

  def _preprocess(self, batch):
    texts = self.prompts(batch["label"])
    drop = captions.position_uniform(batch["position"], self.config.seed + 1)
    texts = ["" if d < self.config.diffusion.cond_drop_prob else t for t, d in zip(texts, drop)]
    return {"mean": batch["mean"], "logvar": batch["logvar"],
            "tokens": self.tokenizer.encode(texts)}

  def train_dataset(self, sharding: pipeline.Sharding):
    return pipeline.train_dataset(self.train_source, global_batch_size=self.config.global_batch_size,
                                  seed=self.config.seed, preprocess=self._preprocess,
                                  sharding=sharding)

  # Model and loss.
  def init(self, rng):
    unet_rng, text_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, self.text_encoder.max_len), jnp.int32)
    params = {"unet": self.unet.init(
        unet_rng, jnp.zeros((1, *self.latent_shape)), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, self.text_encoder.max_len, self.text_encoder.width)))["params"]}
    if self.frozen_text is None:
      params["text"] = self.text_encoder.init(text_rng, tokens)["params"]
    return params, {"ema": params}

  def weight_decay_mask(self, params):
    return jax.tree.map(lambda x: x.ndim > 1, params)

  def context(self, params, tokens):
    """tokens [b, len] -> text context [b, len, width] for the U-Net's cross-attention."""
    text_params = params["text"] if "text" in params else self.frozen_text
    return self.text_encoder.apply({"params": text_params}, tokens, return_sequence=True)

  def loss(self, params, extras, batch, rng):
    d = self.config.diffusion
    z_rng, t_rng, noise_rng = jax.random.split(rng, 3)
    z = ae_lib.sample_posterior(z_rng, batch["mean"], batch["logvar"]) * self.latent_scale
    t = diffusion.sample_timesteps(t_rng, z.shape[0], self.schedule)
    noise = jax.random.normal(noise_rng, z.shape)
    x_t = diffusion.q_sample(self.schedule, z, t, noise)
    prediction = self.unet.apply({"params": params["unet"]}, x_t, t,
                                 self.context(params, batch["tokens"]))
    target = diffusion.training_target(self.schedule, z, t, noise, d.prediction_type)
    loss = diffusion.diffusion_loss(prediction, target, t, self.schedule, d.loss_weighting,
                                    prediction_type=d.prediction_type, gamma=d.min_snr_gamma)
    return jnp.mean(loss), ({}, extras)

  def after_update(self, state):
    """EMA of the weights, with the usual warm-up: decay min(d, (1 + n) / (10 + n))."""
    n = state.step.astype(jnp.float32)
    decay = jnp.minimum(self.config.diffusion.ema_decay, (1 + n) / (10 + n))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.extras["ema"],
                       state.params)
    return state.replace(extras={**state.extras, "ema": ema})

  # Evaluation: sample every prompt, decode, judge.
  def _judge_fn(self, ae_params, judge_params, latents):
    """Latents -> (images in [0, 1], judge logits, judge 84-unit features)."""
    x = self.autoencoder.apply({"params": ae_params}, latents / self.latent_scale,
                               method=self.autoencoder.decode)
    images = jnp.clip(x * 0.5 + 0.5, 0.0, 1.0)
    if self.judge is None:
      return images, None, None
    logits, features = self._classify(judge_params, images)
    return images, logits, features

  def _classify(self, judge_params, images):
    mean, std = NORMALISATION[self.config.dataset.name]
    logits, state = self.judge.apply({"params": judge_params}, (images - mean) / std,
                                     capture_intermediates=lambda m, _: m.name == "f6")
    return logits, jnp.tanh(state["intermediates"]["f6"]["__call__"][0])

  def _real_features(self, source, count: int | None = None) -> np.ndarray:
    classify = jax.jit(self._classify)
    images = source.arrays["image"][:count]
    feats = [np.asarray(classify(jax.device_get(self.judge_params),
                                 jnp.asarray(images[i:i + 2000], jnp.float32) / 255.0)[1])
             for i in range(0, len(images), 2000)]
    return np.concatenate(feats)

  def evaluate(self, state) -> dict:
    s = self.config.sampling
    params = state.extras["ema"]
    labels = np.repeat(np.arange(len(self.class_names)), s.samples_per_class)
    cond = self._context(params, jnp.asarray(self.tokenizer.encode(self.prompts(labels))))
    empty = self._uncond_context(params, jnp.asarray(self.tokenizer.encode([""])))
    rng = jax.random.PRNGKey(self.config.seed + 2)  # The same noise at every evaluation.
    if self.judge is not None and self._test_features is None:
      self._test_features = self._real_features(self.eval_source)
      train_images = pipeline.load_source(self.config.dataset, self.config.dataset.train_split)
      self._fld_reference = generative.frechet_distance(
          self._real_features(train_images, len(labels)), self._test_features)

    metrics, grid = {}, s.grid_per_class
    for g in s.guidance_scales:
      latents = self.sampler({"params": params["unet"]}, rng, cond, empty, g)
      images, logits, features = self._judge(self.ae_params, getattr(self, "judge_params", None),
                                             latents)
      images = np.asarray(images).reshape(len(self.class_names), s.samples_per_class,
                                          *IMAGE_SHAPE)
      metrics[f"samples/guidance_{g:g}"] = generative.image_grid(
          images[:, :grid].reshape(-1, *IMAGE_SHAPE), rows=len(self.class_names))
      if self.judge is not None:
        accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
        metrics[f"eval/sample_accuracy/guidance_{g:g}"] = accuracy
        metrics[f"eval/fld/guidance_{g:g}"] = generative.frechet_distance(
            np.asarray(features), self._test_features)
    if self.judge is not None:
      best = max(s.guidance_scales, key=lambda g: metrics[f"eval/sample_accuracy/guidance_{g:g}"])
      metrics["eval/best_guidance"] = float(best)
      metrics["eval/sample_accuracy"] = metrics[f"eval/sample_accuracy/guidance_{best:g}"]
      metrics["eval/fld"] = metrics[f"eval/fld/guidance_{best:g}"]
      metrics["eval/fld_reference"] = self._fld_reference
    return metrics
