"""Image classification: a model and softmax cross-entropy.

Evaluated by `evals.classification` (accuracy on a whole split), through `logits`.
The model computes in `config.dtype` with parameters in `config.param_dtype`, in
training and evaluation alike; its logits, and so the loss, are float32.
"""
import jax.numpy as jnp

from mmjax import losses
from mmjax import models
from mmjax.data import image
from mmjax.data import sources
from mmjax.tasks import base

MODELS = {"lenet5": models.LeNet5, "small_cnn": models.SmallCNN}


class ClassifyTask(base.Task):
  """Trains `config.model` on `config.dataset` with softmax cross-entropy."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    if config.model not in MODELS:
      raise ValueError(f"config.model={config.model!r}: choose one of {sorted(MODELS)}.")
    self.model = MODELS[config.model](**base.model_options(config, "classify", remat=False))
    self._preprocess = image.image_classification_preprocess(
        *image.normalisation(config.dataset.name))

  def setup(self):
    super().setup()
    classes = sources.num_classes(self.train_source)  # From the dataset's TFDS info.
    if classes is not None:
      self.model = self.model.clone(num_classes=classes)

  def train_preprocess(self, batch):
    """Examples -> normalised images and int32 labels, checked against the model's classes."""
    sources.check_labels(batch["label"], self.model.num_classes, "classify")
    return self._preprocess(batch)

  eval_preprocess = train_preprocess

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1, *self.image_shape), jnp.float32))["params"], {}

  def loss(self, params, extras, batch, rng):
    logits = self.model.apply({"params": params}, batch["image"], train=True)
    loss = jnp.mean(losses.softmax_cross_entropy(logits, batch["label"]))
    accuracy = jnp.mean(losses.top1_correct(logits, batch["label"]))
    return loss, ({"train/accuracy": accuracy}, extras)

  def logits(self, params, extras, images):
    """images [b, h, w, c] -> [b, classes]."""
    return self.model.apply({"params": params}, images)
