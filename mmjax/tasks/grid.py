"""What the tasks that read 2x2 grids of images (VQA, ImageBERT) share: the grids'
normalisation and resizing, and where their ViT starts (random, a CLIP run's image
tower, or an open_clip file's)."""
import jax
import numpy as np

from mmjax import runs
from mmjax.data import image
from mmjax.data import vqa
from mmjax.models import vit
from mmjax.models import vlm


def clip_image_tower(workdir: str, field: str = "clip_workdir"):
  """The ViT parameters ("image_tower") of the CLIP run in `workdir`, on the host."""
  return jax.device_get(runs.load_run(workdir, task="clip", field=field)
                        .params["image_tower"])


class GridImages:
  """The images and the starting ViT of a task that reads 2x2 grids (VQA, ImageBERT).

  Without `config.init_from`: the grids as stored, normalised with the dataset's mean and
  std; the ViT is config.model's (random, or the image tower of `config.clip_workdir`'s
  CLIP run, which the task's `init` puts in).

  With `config.init_from` (an open_clip / OpenAI ViT CLIP safetensors file): each cell is
  resized to the file's image size with 3 channels and normalised with OpenAI CLIP's mean
  and std, so the ViT sees what it was trained on; the ViT has OpenAI's layout and the
  file's sizes (`model_overrides`, for the model's vision_variant and vision_options), and
  `pretrained` gives the task's parameters with the file's image tower as "vision".
  `config.clip_workdir` as well is an error.
  """

  def __init__(self, config, task: str):
    self.config = config
    self.init_from = config.get("init_from") or ""
    self.cell_size = 0  # The loaded tower's image size; 0: cells as stored.
    self.model_overrides = {}
    self.mean, self.std = image.normalisation(config.dataset.name)
    if not self.init_from:
      return
    if config.get("clip_workdir"):
      raise ValueError(f"config.init_from={self.init_from!r} and config.clip_workdir="
                       f"{config.clip_workdir!r} both give the {task} task's ViT: pick one "
                       f"(leave the other empty).")
    from mmjax.interop import open_clip  # pylint: disable=import-outside-toplevel
    clip = open_clip.model_from_file(self.init_from, **open_clip.config_kwargs(config))
    options = {"dims": clip.image_dims, **vit.openai_options(clip.activation)}
    self.model_overrides = {"vision_variant": clip.image_variant,
                            "vision_options": tuple(sorted(options.items()))}
    self.cell_size = open_clip.read_config(self.init_from)["vision_cfg"]["image_size"]
    self.mean, self.std = image.CLIP_MEAN, image.CLIP_STD

  def grid_shape(self, cell_shape) -> tuple[int, int, int]:
    """[h, w, c] of a stored cell -> [H, W, C] of the grids the model reads."""
    if self.cell_size:
      cell_shape = (self.cell_size, self.cell_size, 3)
    return vqa.grid_shape(cell_shape)

  def __call__(self, grids: np.ndarray) -> np.ndarray:
    """uint8 grids [b, 2h, 2w, c] -> float32 [b, H, W, C] (`grid_shape`), normalised."""
    if self.cell_size:
      grids = vqa.resize_cells(grids, self.cell_size, channels=3)
    return image.normalize(grids, self.mean, self.std)

  def pretrained(self, init):
    """init(rng) -> (params, extras): with init_from, init's result for the trainer's key
    (PRNGKey(config.seed)) with "vision" replaced by the file's image tower, NumPy on the
    host; None without.

    The random parts are initialised once here, on the host's default device, so that
    the trainer places the whole tree as arguments of its initialisation and no loaded
    weight is compiled into it as a constant.
    """
    if not self.init_from:
      return None
    from mmjax.interop import open_clip  # pylint: disable=import-outside-toplevel
    _, loaded = open_clip.load(self.init_from, **open_clip.config_kwargs(self.config))
    params, extras = jax.jit(init)(jax.random.PRNGKey(self.config.seed))
    return jax.device_get((vlm.with_vision_params(params, loaded["image_tower"]), extras))
