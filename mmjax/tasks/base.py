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
prediction methods a task offers, each capability a Protocol below that the evaluator
names in its signature:

  evaluator            protocol        the task offers
  classification       Classifier      logits, eval_preprocess
  zeroshot_retrieval   Embedder        embed, class_text_embeddings, eval_preprocess
  reconstruction       Reconstructor   reconstruct, eval_preprocess
  sample_quality       Sampler         sample, class_names
  vqa                  Generator       generate, eval_preprocess
  itm                  Predictor       predict, eval_preprocess

Every evaluator also reads the task's `config` and `mesh` (`Evaluable`).

`extras` is task-owned state that is not trained by the optimizer (an EMA of the
weights); it is checkpointed with the rest. A loss's metrics are named "train/...".
"""
from typing import Protocol, runtime_checkable

import jax
import ml_collections
import numpy as np

from mmjax.data import batching
from mmjax.data import image
from mmjax.data import sources
from mmjax.nn import precision

def image_shape(source, key: str = "image") -> tuple[int, ...]:
  """[height, width, channels] of a source's images, read from its first example."""
  return tuple(np.shape(source[0][key]))


def model_options(config, task: str, *, remat: bool = True, scan: bool = False) -> dict:
  """dtype, param_dtype (and remat, scan_layers where the model has them) from the config.

  `config.dtype` and `config.param_dtype` ("float32", "bfloat16", "float16") become
  dtypes; `config.remat` is passed when `remat`, `config.scan_layers` when `scan`. A
  remat or scan_layers setting that the task's model cannot use is an error saying so.
  """
  options = {"dtype": precision.as_dtype(config.dtype, "config.dtype"),
             "param_dtype": precision.as_dtype(config.param_dtype, "config.param_dtype")}
  policy = precision.check_remat(config.remat, "config.remat")
  if remat:
    options["remat"] = policy
  elif policy != "none":
    raise ValueError(f"config.remat={policy!r}: the {task} task's model has no "
                     f"rematerialised blocks; set it to 'none'.")
  scan_layers = bool(config.scan_layers)
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


# What evaluators call: one Protocol per capability. Arrays are global (split over the
# mesh) inside jit; `batch` is what `eval_preprocess` made, with a "mask" added.


@runtime_checkable
class Evaluable(Protocol):
  """What every evaluator reads of a task."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh


@runtime_checkable
class Preprocessed(Evaluable, Protocol):
  """A task whose evaluator reads a split: examples -> the batch its methods take."""

  def eval_preprocess(self, batch: sources.Batch) -> sources.Batch:
    """A NumPy batch of examples (plus "position") -> the evaluation batch."""


@runtime_checkable
class Classifier(Preprocessed, Protocol):
  """Evaluated by `evals.classification`; batches hold "image" and "label"."""

  def logits(self, params, extras, images: jax.Array) -> jax.Array:
    """images [b, h, w, c] -> logits [b, classes]."""


@runtime_checkable
class Embedder(Preprocessed, Protocol):
  """Evaluated by `evals.zeroshot`, `evals.linear_probe` and `evals.fewshot`; batches hold
  "image", "tokens" and "label"."""

  def embed(self, params, extras, batch) -> tuple[jax.Array, jax.Array]:
    """-> (image embeddings [b, d], text embeddings [b, d])."""

  def class_text_embeddings(self, params, extras) -> np.ndarray | None:
    """-> [classes, templates, d], or None for a task without classes."""


@runtime_checkable
class Reconstructor(Preprocessed, Protocol):
  """Evaluated by `evals.reconstruction`; batches hold "image" in [-1, 1]."""

  def reconstruct(self, params, extras, images: jax.Array):
    """images [b, h, w, c] -> (reconstructions [b, h, w, c], posterior mean, log-variance)."""


@runtime_checkable
class Sampler(Evaluable, Protocol):
  """Evaluated by `evals.sample_quality`: class-conditional samples."""
  class_names: tuple[str, ...]

  def sample(self, params, extras, labels: np.ndarray, guidance: float) -> np.ndarray:
    """labels [n] (class indices) -> images [n, h, w, c] in [0, 1]."""


@runtime_checkable
class Generator(Preprocessed, Protocol):
  """Evaluated by `evals.vqa`; batches hold "image", "prompt", "answer" and "kind"."""

  def generate(self, params, extras, images: jax.Array, prompt: jax.Array) -> jax.Array:
    """images [b, H, W, C], prompt tokens [b, p] -> greedy answer tokens [b, a_len]."""


@runtime_checkable
class Predictor(Preprocessed, Protocol):
  """Evaluated by `evals.itm`; batches hold "image", "tokens", "match", "targets",
  "mlm_tokens" and "mlm_weight"."""

  def predict(self, params, extras, images: jax.Array, tokens: jax.Array) -> dict:
    """-> {"itm_logit": [b], "mlm_logits": [b, T, vocab]}."""
