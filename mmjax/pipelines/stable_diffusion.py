"""Stable Diffusion text-to-image generation in JAX: diffusers' StableDiffusionPipeline.

  pipe = StableDiffusion.from_pretrained("path/to/pipeline-folder")   # see interop.sd_pipeline
  pipe = pipe.with_lora("path/to/lora")         # optional: a diffusers LoRA file, merged
  images = pipe.generate(["a photo of a cat"], negative_prompts=["blurry"], num_steps=25,
                         guidance_scale=7.5, seed=0)       # float32 [n, H, W, 3] in [0, 1]

One compiled function runs everything after tokenizing: the text encoder on prompts
and negative prompts, the denoising loop (a `lax.fori_loop` over the scheduler's plan:
the U-Net on [uncond; cond] latents, guidance uncond + g·(cond − uncond), the scheduler
step), the VAE decoder on latents / scaling_factor, and (x/2 + 0.5) clipped to [0, 1].
The number of steps, the shapes, whether guidance is on (g > 1, as diffusers decides)
and clip_skip pick the compiled program; prompts, latents, seeds, the guidance scale
and the scheduler's arrays are its inputs. The batch is split over every device along a
1-D mesh (the parameters replicated); a batch that does not divide is padded and the
padding dropped. Initial latents are drawn from a seed with jax.random, or given
([n, h, w, 4], NHWC); either way they are multiplied by the scheduler's
init_noise_sigma, as diffusers does with its `latents=`.
"""
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXIS = "batch"


def _guided(out: jax.Array, b: int, scale: jax.Array) -> jax.Array:
  """[uncond; cond] U-Net outputs [2b, ...] -> uncond + scale·(cond − uncond), [b, ...]."""
  uncond, cond = out[:b], out[b:]
  return uncond + scale * (cond - uncond)


@dataclasses.dataclass
class StableDiffusion:
  """The loaded parts of a pipeline and `generate`. Parameters are {"params": ...} trees'
  inner dicts; `scaling_factor` and `shift_factor` come from the VAE's config."""
  unet: Any
  unet_params: Any
  text_encoder: Any
  text_params: Any
  vae: Any
  vae_params: Any
  tokenizer: Any
  scheduler: Any
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  sample_size: int = 64  # The U-Net config's latent size: images are 8x (vae factor) that.
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike, scheduler: str | None = None,
                      dtype=np.float32) -> "StableDiffusion":
    """A diffusers pipeline folder -> StableDiffusion (see mmjax.interop.sd_pipeline).

    Args:
      folder: what StableDiffusionPipeline.save_pretrained writes.
      scheduler: None (the folder's scheduler class), "ddim" or "euler" (that scheduler
        with the folder's betas and options, e.g. for a folder saved with PNDM).
      dtype: the parameters' dtype.
    """
    from mmjax.interop import sd_pipeline  # pylint: disable=import-outside-toplevel
    folder = os.fspath(folder)
    sd_pipeline.check_pipeline_folder(folder)
    part = lambda name: os.path.join(folder, name)
    unet, unet_params, unet_config = sd_pipeline.load_unet(part("unet"), dtype)
    text, text_params, text_config = sd_pipeline.load_text_encoder(part("text_encoder"), dtype)
    vae, vae_params, vae_config = sd_pipeline.load_vae(part("vae"), dtype)
    tokenizer = sd_pipeline.load_tokenizer(part("tokenizer"),
                                           text_config.get("max_position_embeddings", 77))
    sched = sd_pipeline.load_scheduler(part("scheduler"), scheduler)
    if text.hidden_size != unet.cross_attention_dim or (
        vae.latent_channels != unet.in_channels):
      raise ValueError(f"{folder}: the parts do not fit: text_encoder hidden_size "
                       f"{text.hidden_size} vs unet cross_attention_dim "
                       f"{unet.cross_attention_dim}, vae latent_channels "
                       f"{vae.latent_channels} vs unet in_channels {unet.in_channels}.")
    if tokenizer.vocab_size > text.vocab_size:
      raise ValueError(f"{folder}: the tokenizer's {tokenizer.vocab_size} tokens do not fit "
                       f"the text encoder's vocab_size {text.vocab_size}.")
    return cls(unet, unet_params, text, text_params, vae, vae_params, tokenizer, sched,
               float(vae_config["scaling_factor"]), float(vae_config["shift_factor"]),
               int(unet_config.get("sample_size") or 64))

  def with_lora(self, path: str | os.PathLike) -> "StableDiffusion":
    """This pipeline with a diffusers/PEFT LoRA file (`pytorch_lora_weights.safetensors`,
    or its folder, as `load_lora_weights` takes) merged into the U-Net and text encoder
    (mmjax.interop.sd_lora)."""
    from mmjax import lora  # pylint: disable=import-outside-toplevel
    from mmjax.interop import sd_lora  # pylint: disable=import-outside-toplevel
    params, spec = sd_lora.load(path, {"unet": self.unet_params,
                                       "text_encoder": self.text_params})
    merged = lora.merge(params, spec.scale)
    return dataclasses.replace(self, unet_params=merged["unet"],
                               text_params=merged["text_encoder"], _compiled={})

  @property
  def vae_factor(self) -> int:
    """Image pixels per latent: 2^(VAE levels − 1), 8 for SD."""
    return 2 ** (len(self.vae.channel_mult) - 1)

  def encode_prompts(self, prompts: Sequence[str], clip_skip: int = 0) -> jax.Array:
    """Prompts -> the text context [n, max_length, hidden] (the U-Net's cross-attention)."""
    ids = jnp.asarray(self.tokenizer.encode(list(prompts)))
    return self.text_encoder.apply({"params": self.text_params}, ids, clip_skip)

  def _program(self, num_steps: int, guided: bool, clip_skip: int,
               progress: Callable | None) -> Callable:
    """The jitted generation for these static choices (cached)."""
    key = (num_steps, guided, clip_skip, progress)
    if key in self._compiled:
      return self._compiled[key]
    step = self.scheduler.step

    def generate(params, ids, uncond_ids, latents, guidance, plan):
      b = latents.shape[0]
      encode = lambda tokens: self.text_encoder.apply({"params": params["text"]}, tokens,
                                                      clip_skip)
      context = encode(jnp.concatenate([uncond_ids, ids]) if guided else ids)
      x = latents * plan["init_noise_sigma"]

      def body(i, x):
        row = {k: v[i] for k, v in plan.items() if k != "init_noise_sigma"}
        x_in = x * row["input_scale"]
        x_in = jnp.concatenate([x_in, x_in]) if guided else x_in
        out = self.unet.apply({"params": params["unet"]}, x_in, row["timesteps"], context)
        out = _guided(out, b, guidance) if guided else out
        if progress is not None:
          jax.debug.callback(lambda i: progress(int(i) + 1, num_steps), i)
        return step(row, x, out).astype(x.dtype)

      x = jax.lax.fori_loop(0, num_steps, body, x)
      z = x / self.scaling_factor + self.shift_factor
      images = self.vae.apply({"params": params["vae"]}, z, method=self.vae.decode)
      return jnp.clip(images / 2 + 0.5, 0.0, 1.0), x

    self._compiled[key] = jax.jit(generate)
    return self._compiled[key]

  def generate(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None
               = None, *, num_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
               latents: np.ndarray | None = None, height: int | None = None,
               width: int | None = None, clip_skip: int = 0,
               progress: Callable[[int, int], None] | None = None,
               return_latents: bool = False):
    """Prompts -> images float32 [n, H, W, 3] in [0, 1] (NumPy).

    Args:
      prompts: one per image (a string: one image).
      negative_prompts: as many, one string for all, or None (the empty prompt), used as
        the unconditional branch of classifier-free guidance.
      num_steps: denoising steps (the scheduler's num_inference_steps).
      guidance_scale: g; guidance is on for g > 1, as in diffusers.
      seed: the initial latents' seed (ignored with `latents`).
      latents: explicit initial latents [n, h, w, latent_channels] (NHWC).
      height, width: image size (multiples of 8 · 2^(U-Net blocks − 1)); default the
        U-Net's sample_size times the VAE factor.
      clip_skip: 0: the text encoder's last layer; k: layer −1−k (diffusers' clip_skip).
      progress: called as progress(step, num_steps) from inside the compiled loop.
      return_latents: also return the final latents [n, h, w, c].
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if negative_prompts is None or isinstance(negative_prompts, str):
      negative_prompts = [negative_prompts or ""] * n
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != n or not n:
      raise ValueError(f"{n} prompts and {len(negative_prompts)} negative prompts: give one "
                       "negative prompt per prompt (or one string for all).")
    c = self.unet.in_channels
    if latents is None:
      f = self.vae_factor
      height = height or self.sample_size * f
      width = width or self.sample_size * f
      if height % f or width % f:
        raise ValueError(f"height={height}, width={width}: use multiples of {f}.")
      latents = jax.random.normal(jax.random.key(seed), (n, height // f, width // f, c))
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[0] != n or latents.shape[-1] != c:
      raise ValueError(f"latents of shape {list(latents.shape)}: expected [{n}, h, w, {c}] "
                       "(NHWC, one per prompt).")
    down = 2 ** (len(self.unet.block_out_channels) - 1)
    if latents.shape[1] % down or latents.shape[2] % down:
      raise ValueError(f"Latents {latents.shape[1]}x{latents.shape[2]}: use multiples of "
                       f"{down} (images of multiples of {down * self.vae_factor}).")
    plan = self.scheduler.plan(num_steps)
    guided = guidance_scale > 1
    ids = self.tokenizer.encode(prompts)
    uncond = self.tokenizer.encode(negative_prompts)

    devices = jax.devices()
    pad = -n % len(devices)
    extend = lambda a: np.concatenate([a, np.repeat(a[:1], pad, 0)]) if pad else a
    mesh = Mesh(np.array(devices), (BATCH_AXIS,))
    split = NamedSharding(mesh, P(BATCH_AXIS))
    replicated = NamedSharding(mesh, P())
    params = jax.device_put({"unet": self.unet_params, "text": self.text_params,
                             "vae": self.vae_params}, replicated)
    arrays = dict(plan.arrays(), init_noise_sigma=np.float32(plan.init_noise_sigma))
    images, final = self._program(num_steps, guided, clip_skip, progress)(
        params, jax.device_put(extend(ids), split), jax.device_put(extend(uncond), split),
        jax.device_put(extend(latents), split), jnp.float32(guidance_scale),
        jax.device_put(arrays, replicated))
    images = np.asarray(images)[:n]
    return (images, np.asarray(final)[:n]) if return_latents else images


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[n, H, W, 3] in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil does."""
  return (np.asarray(images) * 255).round().astype(np.uint8)


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """[n, H, W, c] -> one [rows·H, columns·W, c] image (row-major; blank cells are 0)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  out = np.zeros((rows * h, columns * w, c), images.dtype)
  for i, image in enumerate(images):
    r, k = divmod(i, columns)
    out[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
  return out


def load_pipeline(folder: str | os.PathLike, scheduler: str | None = None,
                  dtype=np.float32) -> StableDiffusion:
  """Alias of StableDiffusion.from_pretrained."""
  return StableDiffusion.from_pretrained(folder, scheduler, dtype)

