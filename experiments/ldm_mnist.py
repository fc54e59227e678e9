r"""Latent diffusion on MNIST: "a handwritten digit seven" -> an image of a seven.

Two stages, each its own run; the diffusion stage reads the autoencoder's workdir and
is judged by the LeNet-5 of experiments/mnist_lenet.py:

  python launch.py --config=experiments/mnist_lenet.py --workdir=workdirs/mnist_lenet
  python launch.py --config=experiments/ldm_mnist.py:stage=autoencoder \
      --workdir=workdirs/ldm_autoencoder --cpu_devices=2
  python launch.py --config=experiments/ldm_mnist.py:stage=diffusion \
      --workdir=workdirs/ldm_diffusion --cpu_devices=2 \
      --config.autoencoder_workdir=workdirs/ldm_autoencoder \
      --config.evals.samples.classifier_workdir=workdirs/mnist_lenet

(those two workdirs are the defaults; --cpu_devices=2 runs data-parallel over the two
cores of a CPU-only machine, which the U-Net's chain of small operations needs to keep
both busy). `clip_workdir=...` conditions on the frozen
text tower of a CLIP run (experiments/clip_mnist.py) instead of a text Transformer
trained with the U-Net. `smoke` runs each stage in seconds on 8 fake devices.

Expected results (2-core CPU, both stages together under 25 minutes): eval/recon_mse of
the autoencoder about 0.002 on the test split; eval/sample_accuracy >= 0.95 at the best
guidance scale (eval/best_guidance), with eval/fld/guidance_{0,1,2,4} next to
eval/fld_reference (as many real training images as samples, against the test split:
the floor at this sample size).
Sample grids: <workdir>/images/samples_guidance_*_<step>.png, one row per digit.
The README's results table has the measured figures.
"""
from mmjax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, stage="autoencoder")
  if arg.stage == "autoencoder":
    c = _autoencoder_config()
  elif arg.stage == "diffusion":
    c = _diffusion_config()
  else:
    raise ValueError(f"stage={arg.stage!r}: use stage=autoencoder or stage=diffusion.")
  if arg.smoke:
    configs.apply_smoke(c)
  if arg.smoke and arg.stage == "diffusion":
    c.dataset.train_split = "train[:4096]"
    c.evals.samples.update(samples_per_class=4, grid_per_class=4)
    c.sampling.num_steps = 4
    c.unet = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=2, groups=4)
    c.text = dict(width=32, depth=1, num_heads=2, mlp_dim=64, max_len=32)
  return c


def _autoencoder_config():
  c = configs.base_config()
  c.task = "autoencoder"
  # 28x28 -> edge-padded 32x32 -> 8x8x4 latents; 8/16/32 channels keep it CPU-sized.
  c.model = dict(channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, latent_channels=4,
                 groups=4, pad=2)
  c.kl_weight = 1e-6
  c.reconstruction_loss = "l1"
  configs.set_steps(c, batch=128, steps=1000, log_every=100, eval_every=500,
                    checkpoint_every=500)
  configs.set_optimizer(c, "adam", learning_rate=2e-3, warmup_steps=100)
  c.evals.reconstruction = dict(type="reconstruction")
  return c


def _diffusion_config():
  c = configs.base_config()
  c.task = "ldm"
  c.autoencoder_workdir = "workdirs/ldm_autoencoder"
  c.clip_workdir = ""  # A CLIP run's workdir: its frozen text tower gives the context.
  c.prompt = "a handwritten digit {}"

  c.unet = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                num_heads=4, groups=8)
  c.text = dict(width=64, depth=1, num_heads=4, mlp_dim=256, max_len=32)
  c.diffusion = dict(schedule="linear", num_timesteps=1000, prediction_type="eps",
                     loss_weighting="none", min_snr_gamma=5.0, cond_drop_prob=0.1,
                     ema_decay=0.999)
  c.sampling = dict(method="ddim", num_steps=25, eta=0.0)
  # 100 samples per digit at each guidance scale, judged by the MNIST LeNet-5 run
  # (classifier_workdir="": no sample accuracy or FLD, only the grids).
  c.evals.samples = dict(type="sample_quality", classifier_workdir="workdirs/mnist_lenet",
                         samples_per_class=100, guidance_scales=(0.0, 1.0, 2.0, 4.0),
                         grid_per_class=8)

  configs.set_steps(c, batch=128, steps=3000, log_every=100, eval_every=1500,
                    checkpoint_every=500)
  # flatten: ~250 small leaves, so one flat vector updates faster and compiles sooner.
  configs.set_optimizer(c, "adamw", learning_rate=1e-3, warmup_steps=200, weight_decay=0.0,
                        grad_clip_norm=1.0, flatten=True)
  return c
