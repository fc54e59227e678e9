"""The task interface: everything the trainer uses of an experiment, and nothing else.

A task binds a model to its data and its loss. The trainer drives it in this order:

  task = tasks.get_task(config, mesh)   # cheap: reads and checks the config, builds modules
  task.setup()                          # once: opens data, reads earlier runs, pre-encodes
  task.train_dataset(sharding)          -> grain.IterDataset of this process's batches
  task.init(rng)                        -> (params, extras)   (inside jit)
  task.pretrained()                     -> (params, extras) on the host, or None (default)
  task.loss(params, extras, batch, rng) -> (loss, (metrics, new_extras))   (inside jit)
  task.after_update(state)              -> state (EMA and the like; identity by default)
  task.weight_decay_mask(params)        -> pytree of bools (default: leaves with ndim >= 2)

A loss that couples the examples of a batch (contrastive: the other examples are each
one's negatives) sets `batch_coupled = True` and splits `loss` into two stages:

  task.embed_for_loss(params, extras, batch, rng)            -> pytree of [b, ...] arrays
  task.loss_from_embeddings(params, extras, embeddings, rng) -> (loss, (metrics, new_extras))

so that gradient accumulation (`config.grad_accum_steps`) keeps the whole global batch
as negatives (the trainer's GradCache scheme, `trainer._loss_and_grads`).

What is frozen is not the task's business: `config.frozen` (regexes over parameter
paths such as "vision/.*") is applied by the trainer and the optimizer. Evaluation
is not either: evaluators (`mmjax/evals`, declared in `config.evals`) call the
prediction methods a task offers (`logits`, `embed`, `generate`, ...), each
documented by the evaluator that uses it.

`extras` is task-owned state that is not trained by the optimizer (an EMA of the
weights); it is checkpointed with the rest. A loss's metrics are named "train/...".
"""
import jax
import ml_collections
import numpy as np

from mmjax.data import batching
from mmjax.data import image
from mmjax.data import sources
from mmjax.data import vqa
from mmjax.models import vit
from mmjax.models import vlm
from mmjax.nn import precision
from mmjax.train import checkpoints

def image_shape(source, key: str = "image") -> tuple[int, ...]:
  """[height, width, channels] of a source's images, read from its first example."""
  return tuple(np.shape(source[0][key]))


def clip_image_tower(workdir: str, field: str = "clip_workdir"):
  """The ViT parameters ("image_tower") of the CLIP run in `workdir`, on the host."""
  return jax.device_get(checkpoints.load_run(workdir, task="clip", field=field)
                        .params["image_tower"])


def open_clip_load_kwargs(config) -> dict:
  """interop.open_clip.load's quick_gelu, vision_heads and text_heads, from the config."""
  return {k: config.get(k) for k in ("quick_gelu", "vision_heads", "text_heads")}


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
    clip = open_clip.model_from_file(self.init_from, **open_clip_load_kwargs(config))
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
    _, loaded = open_clip.load(self.init_from, **open_clip_load_kwargs(self.config))
    params, extras = jax.jit(init)(jax.random.PRNGKey(self.config.seed))
    return jax.device_get((vlm.with_vision_params(params, loaded["image_tower"]), extras))


def model_options(config, task: str, *, remat: bool = True, scan: bool = False) -> dict:
  """dtype, param_dtype (and remat, scan_layers where the model has them) from the config.

  `config.dtype` and `config.param_dtype` ("float32", "bfloat16", "float16") become
  dtypes; `config.remat` is passed when `remat`, `config.scan_layers` when `scan`. A
  remat or scan_layers setting that the task's model cannot use is an error saying so.
  A config without these fields (one saved before they existed) gives float32, no remat,
  no scan.
  """
  options = {"dtype": precision.as_dtype(config.get("dtype") or "float32", "config.dtype"),
             "param_dtype": precision.as_dtype(config.get("param_dtype") or "float32",
                                               "config.param_dtype")}
  policy = precision.check_remat(config.get("remat") or "none", "config.remat")
  if remat:
    options["remat"] = policy
  elif policy != "none":
    raise ValueError(f"config.remat={policy!r}: the {task} task's model has no "
                     f"rematerialised blocks; set it to 'none'.")
  scan_layers = bool(config.get("scan_layers"))
  if scan:
    options["scan_layers"] = scan_layers
  elif scan_layers:
    raise ValueError(f"config.scan_layers=True: the {task} task's model has no scanned form "
                     f"(only the ViT and text Transformer encoders of the clip and ldm tasks "
                     f"scan); set it to False.")
  return options


class Task:
  """Defaults for the members above; an experiment's task overrides what it needs.

  The default `setup` opens the training split as `self.train_source` and reads
  `self.image_shape` from it; with `train_preprocess(batch)` (NumPy batch of examples
  plus "position" -> the batch the loss reads) the default `train_dataset` reads it.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh

  def setup(self) -> None:
    """Expensive set-up, called once by the trainer before anything else."""
    c = self.config
    self.train_source = sources.load_source(c.dataset, c.dataset.train_split)
    self.image_shape = image_shape(self.train_source)

  def train_dataset(self, sharding: batching.Sharding):
    return batching.train_dataset(
        self.train_source, global_batch_size=self.config.global_batch_size,
        seed=self.config.seed, sharding=sharding, preprocess=self.train_preprocess)

  def train_preprocess(self, batch: sources.Batch) -> sources.Batch:
    raise NotImplementedError(f"{type(self).__name__} must define train_preprocess or "
                              f"train_dataset.")

  def init(self, rng: jax.Array):
    raise NotImplementedError

  def pretrained(self):
    """(params, extras) loaded from files (NumPy), or None: then `init` makes them. Loaded
    weights are placed on the devices as they are, not compiled into a program."""
    return None

  def loss(self, params, extras, batch, rng):
    raise NotImplementedError

  batch_coupled = False  # True: embed_for_loss and loss_from_embeddings are defined.

  def embed_for_loss(self, params, extras, batch, rng):
    raise NotImplementedError

  def loss_from_embeddings(self, params, extras, embeddings, rng):
    raise NotImplementedError

  def after_update(self, state):
    return state

  def weight_decay_mask(self, params):
    """Decay matrices, kernels and embeddings; not biases, norms or scalars."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)
