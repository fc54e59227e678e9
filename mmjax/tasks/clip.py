"""CLIP pretraining on captioned images: contrastive loss over the global batch,
zero-shot classification and cross-modal retrieval on the whole test split."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import losses
from mmjax.data import captions
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.evals import retrieval
from mmjax.models import clip as clip_model
from mmjax.tasks.classify import NORMALISATION
from mmjax.train import sharding as sharding_lib


class ClipTask:
  """Trains `clip_model.CLIP` on (image, templated caption) pairs."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    captions.check_dataset(config.dataset.name)
    if config.loss not in ("softmax", "sigmoid"):
      raise ValueError(f"config.loss={config.loss!r}: use 'softmax' (InfoNCE) or 'sigmoid'.")
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    self.config = config
    self.mesh = mesh
    self.model = clip_model.CLIP(**config.model.to_dict(), sigmoid=config.loss == "sigmoid")
    self.max_text_len = config.model.max_text_len
    self.image_shape = (28, 28, 1)
    self.tokenizer = tokenizer_lib.ByteTokenizer(max_len=self.max_text_len)
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    self.mean, self.std = NORMALISATION.get(config.dataset.name, (0.5, 0.5))
    self.train_source = pipeline.load_source(config.dataset, config.dataset.train_split)
    self.eval_source = pipeline.load_source(config.dataset, config.dataset.eval_split)
    self._embed = jax.jit(self._embed_batch, out_shardings=sharding_lib.replicated(mesh))
    self._encode_text = jax.jit(functools.partial(self.model.apply, method=self.model.encode_text))

  # Data.
  def _preprocess(self, batch, templates):
    image = pipeline.normalize_images(batch["image"], self.mean, self.std)
    ids = captions.template_choice(batch["position"], len(templates), self.config.seed)
    texts = captions.captions(self.config.dataset.name, batch["label"], ids, templates)
    return {"image": image, "tokens": self.tokenizer.encode(texts),
            "label": batch["label"].astype(np.int32)}

  def train_dataset(self, sharding: pipeline.Sharding):
    templates = captions.TRAIN_TEMPLATES[self.config.dataset.name]
    return pipeline.train_dataset(
        self.train_source, global_batch_size=self.config.global_batch_size,
        seed=self.config.seed, sharding=sharding,
        preprocess=functools.partial(self._preprocess, templates=templates))

  # Model and loss.
  def init(self, rng):
    image = jnp.zeros((1, *self.image_shape), jnp.float32)
    tokens = jnp.zeros((1, self.max_text_len), jnp.int32)
    return self.model.init(rng, image, tokens)["params"], {}

  def weight_decay_mask(self, params):
    return clip_model.weight_decay_mask(params)

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

  # Evaluation.
  def _embed_batch(self, params, batch):
    """Embeddings of a global eval batch, with its labels and mask, on every process."""
    variables = {"params": params}
    image_emb = self.model.apply(variables, batch["image"], method=self.model.encode_image)
    text_emb = self.model.apply(variables, batch["tokens"], method=self.model.encode_text)
    return image_emb, text_emb, batch["label"], batch["mask"]

  def _class_text_embeddings(self, params) -> np.ndarray:
    """[classes, templates, dim] embeddings of every held-out template of every class."""
    templates = captions.EVAL_TEMPLATES[self.config.dataset.name]
    texts = [t.format(name) for name in self.class_names for t in templates]
    emb = self._encode_text({"params": params}, jnp.asarray(self.tokenizer.encode(texts)))
    return np.asarray(emb).reshape(len(self.class_names), len(templates), -1)

  def evaluate(self, state) -> dict[str, float]:
    templates = captions.EVAL_TEMPLATES[self.config.dataset.name]
    dataset = pipeline.eval_dataset(
        self.eval_source, global_batch_size=self.config.eval_batch_size,
        sharding=pipeline.Sharding(jax.process_index(), jax.process_count()),
        preprocess=functools.partial(self._preprocess, templates=templates))
    images, texts, labels = [], [], []
    for local in dataset:
      batch = sharding_lib.global_batch(local, self.mesh)
      image_emb, text_emb, label, mask = map(np.asarray, self._embed(state.params, batch))
      images.append(image_emb[mask > 0])
      texts.append(text_emb[mask > 0])
      labels.append(label[mask > 0])
    images, texts, labels = map(np.concatenate, (images, texts, labels))

    class_emb = retrieval.class_embeddings(self._class_text_embeddings(state.params))
    metrics = {"eval/zeroshot_top1": retrieval.zeroshot_top1(images, class_emb, labels)}
    for name, (q, items) in {"i2t": (images, texts), "t2i": (texts, images)}.items():
      for k, r in retrieval.recall_at_k(q, items, labels, labels).items():
        metrics[f"eval/{name}_recall@{k}"] = r
    return metrics
