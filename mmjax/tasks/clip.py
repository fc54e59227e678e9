"""CLIP pretraining on captioned images: a contrastive loss over the global batch.

Evaluated by `evals.zeroshot` (zero-shot classification and cross-modal retrieval),
through `embed` and `class_text_embeddings`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses
from mmjax.data import captions
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.models import clip as clip_model
from mmjax.tasks import base


class ClipTask(base.Task):
  """Trains `clip_model.CLIP` on (image, templated caption) pairs."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    captions.check_dataset(config.dataset.name)
    if config.loss not in ("softmax", "sigmoid"):
      raise ValueError(f"config.loss={config.loss!r}: use 'softmax' (InfoNCE) or 'sigmoid'.")
    self.model = clip_model.CLIP(**config.model.to_dict(), sigmoid=config.loss == "sigmoid")
    self.max_text_len = config.model.max_text_len
    self.tokenizer = tokenizer_lib.ByteTokenizer(max_len=self.max_text_len)
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    self.mean, self.std = pipeline.normalisation(config.dataset.name)
    self.train_preprocess = functools.partial(
        self.preprocess, templates=captions.TRAIN_TEMPLATES[config.dataset.name])
    self.eval_preprocess = functools.partial(
        self.preprocess, templates=captions.EVAL_TEMPLATES[config.dataset.name])
    self._encode_text = jax.jit(functools.partial(self.model.apply,
                                                  method=self.model.encode_text))

  def preprocess(self, batch, templates):
    """Examples -> {"image": normalised, "tokens": a templated caption, "label"}."""
    image = pipeline.normalize_images(batch["image"], self.mean, self.std)
    ids = captions.template_choice(batch["position"], len(templates), self.config.seed)
    texts = captions.captions(self.config.dataset.name, batch["label"], ids, templates)
    return {"image": image, "tokens": self.tokenizer.encode(texts),
            "label": batch["label"].astype(np.int32)}

  # Model and loss.
  def init(self, rng):
    image = jnp.zeros((1, *self.image_shape), jnp.float32)
    tokens = jnp.zeros((1, self.max_text_len), jnp.int32)
    return self.model.init(rng, image, tokens)["params"], {}

  def loss(self, params, extras, batch, rng):
    out = self.model.apply({"params": params}, batch["image"], batch["tokens"])
    img, txt = out["image_emb"], out["text_emb"]
    if self.config.loss == "softmax":
      temperature = 1.0 / out["logit_scale"]
      loss = losses.info_nce_sharded(img, txt, temperature, self.mesh)
    else:
      loss = losses.sigmoid_contrastive_sharded(img, txt, jnp.log(out["logit_scale"]),
                                                out["logit_bias"], self.mesh)
    # Both towers already return unit vectors; the losses normalise again (harmless).
    # In-batch accuracy: is each image's own caption its nearest among the global batch?
    nearest = jnp.argmax(img @ txt.T, axis=1)
    accuracy = jnp.mean(nearest == jnp.arange(img.shape[0]))
    return loss, ({"train/temperature": 1.0 / out["logit_scale"],
                   "train/contrastive_accuracy": accuracy}, extras)

  # What the evaluators call.
  def embed(self, params, extras, batch):
    """A batch's (image embeddings [b, dim], caption embeddings [b, dim]), unit norm."""
    variables = {"params": params}
    return (self.model.apply(variables, batch["image"], method=self.model.encode_image),
            self.model.apply(variables, batch["tokens"], method=self.model.encode_text))

  def class_text_embeddings(self, params, extras) -> np.ndarray:
    """[classes, templates, dim] embeddings of every held-out template of every class."""
    templates = captions.EVAL_TEMPLATES[self.config.dataset.name]
    texts = [t.format(name) for name in self.class_names for t in templates]
    emb = self._encode_text({"params": params}, jnp.asarray(self.tokenizer.encode(texts)))
    return np.asarray(emb).reshape(len(self.class_names), len(templates), -1)
