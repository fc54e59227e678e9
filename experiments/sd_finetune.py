r"""Fine-tuning a diffusers Stable Diffusion 1.x/2.x pipeline folder (task "sd").

The U-Net trains on the dataset's images and captions with diffusers' text-to-image
objective; the VAE and the text encoder are frozen (`config.frozen`; the text encoder
trains too with --config.frozen='("vae/.*",)'). At each evaluation a grid of
samples, one row per prompt, is written to <workdir>/images/samples_guidance_*_<step>.png.
See mmjax/tasks/sd.py.

  # MNIST digits captioned "a handwritten digit seven" (and the like), upscaled to the
  # pipeline's resolution and repeated to RGB:
  python launch.py --config=experiments/sd_finetune.py --workdir=workdirs/sd_mnist \
      --config.init_from=PIPELINE_FOLDER
  # Image-caption pairs of one's own (python -m mmjax.data.make_dataset), e.g. the
  # generated shapes of experiments/clip_captions.py:
  python launch.py --config=experiments/sd_finetune.py:name=shapes,data_dir=data/tfds \
      --workdir=workdirs/sd_shapes --config.init_from=PIPELINE_FOLDER
  # The fine-tuned weights back into a pipeline folder, and images from it:
  python -m mmjax.interop.sd_export --workdir=workdirs/sd_mnist --out=exported/sd_mnist
  python -m mmjax.generate --pretrained=exported/sd_mnist --prompt="a handwritten digit seven"

Config arguments: name (a TFDS dataset: mnist and fashion_mnist are captioned by class
name templates, any other by its "caption" feature), data_dir (its TFDS data directory;
empty: $TFDS_DATA_DIR), smoke (4 steps of 8 images and 2 sampling steps, for a tiny
pipeline such as tests/fixtures/sd_tiny/sd1_ddim; its time is mostly compilation).

`--config.init_from` is required (no default): a run without it stops with one line
saying so. Expected result: train/loss (the noise-prediction MSE) falls. Measured on
the random tiny fixture only (no real pipeline was fine-tuned here), on MNIST:
0.96 at step 50 to 0.23 at step 300 with

  python launch.py --config=experiments/sd_finetune.py --workdir=workdirs/sd_mnist_tiny \
      --config.init_from=tests/fixtures/sd_tiny/sd1_ddim --config.num_train_steps=300 \
      --config.log_every_steps=50 --config.optimizer.learning_rate=1e-3 \
      --config.dataset.train_split='train[:10000]'

(its samples are noise: the fixture's VAE is random).
"""
from mmjax import configs

CLASS_NAMED = ("mnist", "fashion_mnist")  # Captioned by mmjax.data.captions's templates.


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, name="mnist", data_dir="")
  c = configs.base_config()
  c.task = "sd"
  c.init_from = ""  # A diffusers StableDiffusionPipeline folder: required.
  c.frozen = ("vae/.*", "text_encoder/.*")
  c.dataset.name = arg.name
  c.dataset.data_dir = arg.data_dir or None
  # Captions: class names through templates (empty class_names / templates: those of
  # mmjax.data.captions), or the dataset's own "caption" text.
  c.captions = "templates" if arg.name in CLASS_NAMED else "data"
  c.class_names = ()
  c.templates = ()
  if c.captions == "data":
    c.dataset.eval_split = "validation"
    c.dataset.download = False  # One's own data: nothing to download.
  # size 0: the pipeline's (the U-Net's sample_size times the VAE's factor).
  c.image = dict(size=0, min_crop=1.0 if c.captions == "templates" else 0.8)
  c.clip_skip = 0  # Text encoder layers skipped at the end (diffusers' clip_skip).
  c.diffusion = dict(cond_drop_prob=0.1, loss_weighting="none", min_snr_gamma=5.0)
  # Samples: `prompt` formatted with each class name, or (captions from the data) these
  # prompts; guidance as in diffusers (> 1 guides).
  c.sampling = dict(num_steps=25, prompt="a handwritten digit {}",
                    prompts=("a large red circle at the centre",
                             "a small blue square at the top left",
                             "a large green triangle at the bottom right"))
  if arg.name == "fashion_mnist":
    c.sampling.prompt = "a photo of a {}"
  c.evals.samples = dict(type="sample_quality", classifier_workdir="", samples_per_class=4,
                         guidance_scales=(1.0, 5.0), grid_per_class=4)

  c.global_batch_size = 32
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-5
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 1e-2
  c.optimizer.grad_clip_norm = 1.0

  if arg.smoke:
    configs.apply_smoke(c, steps=4, batch=8)
    c.dataset.train_split = "train[:512]"
    if c.captions == "data":
      c.dataset.eval_split = "validation"
    c.sampling.num_steps = 2
    # 8 per prompt (a multiple of 8 fake devices), one guidance scale: one compile.
    c.evals.samples.update(samples_per_class=8, grid_per_class=2, guidance_scales=(3.0,))
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 0
  return c
