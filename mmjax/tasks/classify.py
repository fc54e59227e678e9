"""Image classification: a model, cross-entropy, accuracy on the whole test split."""
import functools

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import losses
from mmjax import models
from mmjax.data import pipeline
from mmjax.evals import common
from mmjax.train import sharding as sharding_lib

# Mean and standard deviation of the training pixels in [0, 1].
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}

MODELS = {"lenet5": lambda: models.LeNet5(), "small_cnn": lambda: models.SmallCNN()}


class ClassifyTask:
  """Trains `config.model` on `config.dataset` with softmax cross-entropy."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    if config.model not in MODELS:
      raise ValueError(f"config.model={config.model!r}: choose one of {sorted(MODELS)}.")
    self.config = config
    self.mesh = mesh
    self.model = MODELS[config.model]()
    mean, std = NORMALISATION.get(config.dataset.name, (0.5, 0.5))
    self.preprocess = pipeline.image_classification_preprocess(mean, std)
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    # Fail on a missing dataset now, before anything compiles.
    self.train_source = pipeline.load_source(config.dataset, config.dataset.train_split)
    self.eval_source = pipeline.load_source(config.dataset, config.dataset.eval_split)
    self._eval_sums = jax.jit(self._batch_sums)

  def train_dataset(self, sharding: pipeline.Sharding):
    return pipeline.train_dataset(
        self.train_source, global_batch_size=self.config.global_batch_size,
        seed=self.config.seed, preprocess=self.preprocess, sharding=sharding)

  def init(self, rng):
    image = jnp.zeros((1, 28, 28, 1), jnp.float32)
    return self.model.init(rng, image)["params"], {}

  def weight_decay_mask(self, params):
    return jax.tree.map(lambda x: x.ndim > 1, params)  # Kernels only, not biases.

  def loss(self, params, extras, batch, rng):
    logits = self.model.apply({"params": params}, batch["image"], train=True)
    loss = jnp.mean(losses.softmax_cross_entropy(logits, batch["label"]))
    accuracy = jnp.mean(losses.top1_correct(logits, batch["label"]))
    return loss, ({"train/accuracy": accuracy}, extras)

  def _batch_sums(self, params, batch):
    logits = self.model.apply({"params": params}, batch["image"])
    mask = batch["mask"]
    return {"loss": jnp.sum(losses.softmax_cross_entropy(logits, batch["label"]) * mask),
            "accuracy": jnp.sum(losses.top1_correct(logits, batch["label"]) * mask),
            "count": jnp.sum(mask)}

  def evaluate(self, state) -> dict[str, float]:
    dataset = pipeline.eval_dataset(
        self.eval_source, global_batch_size=self.config.eval_batch_size,
        preprocess=self.preprocess,
        sharding=pipeline.Sharding(jax.process_index(), jax.process_count()))
    totals = common.sum_over_batches(functools.partial(self._eval_sums, state.params),
                                     dataset, self.mesh)
    return common.means(totals)
