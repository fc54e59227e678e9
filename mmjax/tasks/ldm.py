"""Latent diffusion in two stages: a KL autoencoder, then a text-conditioned U-Net.

Stage 1 (`task="autoencoder"`) trains `AutoencoderKL` on images scaled to [-1, 1].
Stage 2 (`task="ldm"`) reads that autoencoder from `config.autoencoder_workdir`,
encodes the training split to latents once, and trains a U-Net (with a small text
Transformer, or the frozen text tower of a CLIP run) to denoise them, conditioned on
"a handwritten digit seven" and the like; the caption is dropped to "" with
probability `config.diffusion.cond_drop_prob` for classifier-free guidance. An EMA of
the weights is kept in the train state's extras and used for sampling. Samples are
judged by the classifier trained in `config.evals.samples.classifier_workdir` (the MNIST LeNet-5
experiment) in `evals.sample_quality`: accuracy against the prompt's digit and
Fréchet distance in its 84-unit feature space. The autoencoder is evaluated by
`evals.reconstruction`.

Every model here (the autoencoder, the U-Net, the text encoder, and in stage 2 the
loaded autoencoder and CLIP text tower) computes in `config.dtype`; `config.remat`
recomputes the autoencoder's, the U-Net's and the text encoder's blocks in the
backward pass, and `config.scan_layers` scans the stage-2 text encoder trained with the
U-Net (a loaded CLIP text tower keeps the layout its run used).
"""
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import captions
from mmjax.data import seeded
from mmjax.data import sources
from mmjax.data import tokenizer as tokenizer_lib
from mmjax import diffusion
from mmjax.models import autoencoder as ae_lib
from mmjax.models.text import TextTransformer
from mmjax.models.unet import UNet
from mmjax import parallel
from mmjax import runs
from mmjax.tasks import base


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [b, h, w, c] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def module_kwargs(d) -> dict:
  """Config dict -> module fields; JSON lists back to the tuples linen fields expect."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d).items()}


class AutoencoderTask(base.Task):
  """Stage 1: images -> 8x8 latents -> images, L1 (or L2) + a small KL weight."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.model = ae_lib.AutoencoderKL(**module_kwargs(config.model),
                                      **base.model_options(config, "autoencoder"))

  def train_preprocess(self, batch):
    return {"image": to_unit_range(batch["image"])}

  eval_preprocess = train_preprocess

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1, *self.image_shape)))["params"], {}

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

  def reconstruct(self, params, extras, images):
    """images [b, h, w, c] in [-1, 1] -> (reconstructions from the posterior mean,
    posterior mean, log-variance)."""
    return self.model.apply({"params": params}, images)


class LatentDiffusionTask(base.Task):
  """Stage 2: a U-Net denoising autoencoder latents, conditioned on captions."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    captions.check_dataset(config.dataset.name)
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    d = config.diffusion
    self.schedule = diffusion.make_schedule(d.schedule, d.num_timesteps)
    self.repl = parallel.replicated(mesh)
    self.options = base.model_options(config, "ldm", scan=True)

  def setup(self):
    c = self.config
    # The first stage, and the text encoder: a small Transformer trained with the
    # U-Net, or a CLIP run's text tower, kept frozen outside the trained parameters.
    ae_run = runs.load_run(c.autoencoder_workdir, task="autoencoder",
                                  field="autoencoder_workdir")
    types = {k: self.options[k] for k in ("dtype", "param_dtype")}
    self.autoencoder = ae_lib.AutoencoderKL(**module_kwargs(ae_run.field("model")), **types)
    self.ae_params = jax.device_put(ae_run.params, self.repl)
    if c.clip_workdir:
      clip_run = runs.load_run(c.clip_workdir, task="clip", field="clip_workdir")
      m = lambda name: clip_run.field(f"model.{name}")
      self.text_encoder = TextTransformer(m("text_width"), m("text_depth"), m("text_heads"),
                                          m("text_mlp_dim"), max_len=m("max_text_len"),
                                          scan_layers=bool(clip_run.field("scan_layers")),
                                          **types)
      self.frozen_text = jax.device_put(clip_run.params["text_tower"], self.repl)
    else:
      self.text_encoder = TextTransformer(**module_kwargs(c.text), **self.options)
      self.frozen_text = None
    self.tokenizer = tokenizer_lib.ByteTokenizer(max_len=self.text_encoder.max_len)
    unet_options = {k: v for k, v in self.options.items() if k != "scan_layers"}
    self.unet = UNet(**module_kwargs(c.unet), context_dim=self.text_encoder.width,
                     **unet_options)

    images = sources.load_source(c.dataset, c.dataset.train_split)
    self.image_shape = base.image_shape(images)
    self.train_source = self._encode(images)
    self.latent_shape = self.train_source.arrays["mean"].shape[1:]
    self.latent_scale = self._latent_scale()
    logging.info("Latents %s, scale factor %.4f (1 / std of the %d training latents).",
                 self.latent_shape, self.latent_scale, len(self.train_source))
    s = c.sampling
    self.sampler = diffusion.make_sampler(
        lambda v, x, t, ctx: self.unet.apply(v, x, t, ctx), self.schedule, self.latent_shape,
        num_steps=s.num_steps, method=s.method, eta=s.eta,
        prediction_type=c.diffusion.prediction_type)
    self._context = jax.jit(self.context, out_shardings=parallel.batch_sharded(self.mesh))
    self._uncond_context = jax.jit(self.context, out_shardings=self.repl)
    self._decode = jax.jit(self._decode_fn, out_shardings=self.repl)

  # Data: the training split's posterior moments, computed once per run.
  def _encode(self, images) -> sources.ArraySource:
    if not isinstance(images, sources.ArraySource):
      raise ValueError("The diffusion stage needs config.dataset.cache_decoded = True.")
    arrays = images.arrays
    encode = jax.jit(lambda p, x: self.autoencoder.apply({"params": p}, x,
                                                         method=self.autoencoder.encode))
    params = jax.device_get(self.ae_params)
    means, logvars = [], []
    for i in range(0, len(images), 2000):
      mean, logvar = encode(params, jnp.asarray(to_unit_range(arrays["image"][i:i + 2000])))
      means.append(np.asarray(mean))
      logvars.append(np.asarray(logvar))
    return sources.ArraySource({"mean": np.concatenate(means),
                                 "logvar": np.concatenate(logvars),
                                 "label": arrays["label"].astype(np.int32)})

  def _latent_scale(self) -> float:
    """1 / std of posterior samples of the training latents (fixed noise seed)."""
    a = self.train_source.arrays
    noise = np.random.default_rng(0).standard_normal(a["mean"].shape, np.float32)
    return ae_lib.latent_scale_factor(a["mean"] + np.exp(0.5 * a["logvar"]) * noise)

  def prompts(self, labels) -> list[str]:
    return [self.config.prompt.format(self.class_names[y]) for y in np.asarray(labels).tolist()]

  def train_preprocess(self, batch):
    texts = self.prompts(batch["label"])
    drop = seeded.uniform(batch["position"], self.config.seed + 1)
    texts = ["" if d < self.config.diffusion.cond_drop_prob else t for t, d in zip(texts, drop)]
    return {"mean": batch["mean"], "logvar": batch["logvar"],
            "tokens": self.tokenizer.encode(texts)}

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
    """EMA of the weights, with the usual warm-up: decay min(d, (1 + n) / (10 + n)).
    Written e + (1 - d)(p - e), so a weight equal to its average (a frozen one, started
    from the EMA) keeps it exactly."""
    n = state.step.astype(jnp.float32)
    decay = jnp.minimum(self.config.diffusion.ema_decay, (1 + n) / (10 + n))
    ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), state.extras["ema"],
                       state.params)
    return state.replace(extras={**state.extras, "ema": ema})

  # What the evaluators call.
  def _decode_fn(self, latents):
    x = self.autoencoder.apply({"params": self.ae_params}, latents / self.latent_scale,
                               method=self.autoencoder.decode)
    return jnp.clip(x * 0.5 + 0.5, 0.0, 1.0)

  def sample(self, params, extras, labels: np.ndarray, guidance: float) -> np.ndarray:
    """Images [n, h, w, c] in [0, 1] for the prompts of `labels` [n], sampled with the
    EMA weights, classifier-free guidance `guidance` and the same noise every time."""
    ema = extras["ema"]
    cond = self._context(ema, jnp.asarray(self.tokenizer.encode(self.prompts(labels))))
    empty = self._uncond_context(ema, jnp.asarray(self.tokenizer.encode([""])))
    rng = jax.random.PRNGKey(self.config.seed + 2)
    latents = self.sampler({"params": ema["unet"]}, rng, cond, empty, guidance)
    return np.asarray(self._decode(latents))
