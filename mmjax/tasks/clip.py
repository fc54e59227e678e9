"""CLIP on captioned images: a contrastive loss over the global batch.

Evaluated by `evals.zeroshot` (zero-shot classification and cross-modal retrieval),
through `embed` and `class_text_embeddings`.

Where the captions come from (`config.captions`):
  "templates": a classification dataset's labels through prompt templates, as in
    experiments/clip_mnist.py. Class names and evaluation templates are
    `config.zeroshot.class_names` / `.templates`, by default mmjax.data.captions's for
    MNIST and Fashion-MNIST.
  "data": the dataset's own "caption" text (a dataset made by mmjax.data.make_dataset).
    Retrieval counts each caption relevant to its own image only (the example's index
    in the split is its label); there is no zero-shot classification.

Images (`config.image`): `size` (0: as stored, or the loaded model's) square crops,
random in training (side a fraction in [min_crop, 1] of the shorter one, drawn from the
seed and the example's position) and centred in evaluation, resized; normalised with
`mean`/`std` (empty: the dataset's, or OpenAI CLIP's for loaded weights).

Pretrained weights (`config.init_from`: an open_clip / OpenAI ViT CLIP safetensors file,
or a Hugging Face CLIPModel or SiglipModel folder; see mmjax.interop.load_pretrained):
the model is their architecture (`config.model` is not used), `init` returns their
parameters, images get 3 channels at their resolution, and for an open_clip file
`config.quick_gelu`, `config.vision_heads` and `config.text_heads` say what the file may
not record (see mmjax/interop/open_clip.py). The text is tokenized by `config.tokenizer`:
kind="auto" (the default: a Hugging Face folder's own tokenizer when it has one, else
"byte"), "byte" (mmjax's byte tokenizer), "pretrained" (the folder's tokenizer.json, or
vocab.json + merges.txt) or "bpe" with vocab=<bpe_simple_vocab_16e6.txt.gz> (CLIP's, what
open_clip's weights expect). `config.zeroshot.template_set` names a set of evaluation
templates of mmjax.data.templates (e.g. "openai_imagenet", OpenAI's 80).

Precision and memory: the model computes in `config.dtype` with parameters in
`config.param_dtype` (embeddings, logits and loss float32), `config.remat` recomputes
the towers' blocks in the backward pass, and `config.scan_layers` scans them (not with
`init_from`, whose weights are unscanned). `config.model.dropout_rate` (default 0)
drops attention weights and residual branches in training only (the "dropout" rng
comes from the train step's key); evaluation is deterministic.
"""
import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import captions
from mmjax.data import image as image_lib
from mmjax.data import seeded
from mmjax.data import templates as templates_lib
from mmjax.data import tokenizer as tokenizer_lib
from mmjax import losses
from mmjax.models import clip as clip_model
from mmjax import parallel
from mmjax.tasks import base


class ClipTask(base.Task):
  """Trains `clip_model.CLIP` on (image, caption) pairs; captions templated or the data's."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    if config.loss not in ("softmax", "sigmoid"):
      raise ValueError(f"config.loss={config.loss!r}: use 'softmax' (InfoNCE) or 'sigmoid'.")
    self.caption_source = config.captions
    if self.caption_source not in ("templates", "data"):
      raise ValueError(f"config.captions={self.caption_source!r}: use 'templates' (class "
                       f"names through prompt templates) or 'data' (the dataset's 'caption').")
    self.init_from = config.init_from
    options = base.model_options(config, "clip", scan=True)
    self.found = None  # With init_from: what mmjax.interop.load_pretrained found there.
    if self.init_from:
      if options["scan_layers"]:
        raise ValueError(f"config.scan_layers=True with config.init_from={self.init_from!r}: "
                         f"pretrained weights are in the unscanned layout; set "
                         f"scan_layers=False.")
      from mmjax.interop import open_clip  # pylint: disable=import-outside-toplevel
      from mmjax.interop import pretrained  # pylint: disable=import-outside-toplevel
      self.found = pretrained.load_pretrained(self.init_from, weights=False,
                                              **open_clip.config_kwargs(config))
      logging.info("config.init_from: %s", self.found.describe())
      self.model = self.found.model.clone(**options)
      if self.model.sigmoid != (config.loss == "sigmoid"):
        raise ValueError(f"config.loss={config.loss!r}, but {self.init_from} is a "
                         f"{'SigLIP-style (logit_bias)' if self.model.sigmoid else 'softmax'} "
                         f"CLIP: set --config.loss="
                         f"{'sigmoid' if self.model.sigmoid else 'softmax'}.")
    else:
      self.model = clip_model.CLIP(**config.model.to_dict(),
                                   sigmoid=config.loss == "sigmoid", **options)
    self.max_text_len = self.model.max_text_len
    self.tokenizer = self._make_tokenizer(config.tokenizer)

    zeroshot = config.zeroshot
    name = config.dataset.name
    self.class_names = tuple(zeroshot.get("class_names") or ())
    self.eval_templates = tuple(zeroshot.get("templates") or ())
    if zeroshot.get("template_set"):
      self.eval_templates = templates_lib.get(zeroshot["template_set"])
    if self.caption_source == "templates":
      if not self.class_names:
        captions.check_dataset(name)
        self.class_names = captions.CLASS_NAMES[name]
      self.eval_templates = self.eval_templates or captions.EVAL_TEMPLATES.get(name, ("{}",))
      self.train_templates = captions.TRAIN_TEMPLATES.get(name, self.eval_templates)
    else:
      self.class_names = ()  # The labels are example ids: nothing to classify.

    image = config.image
    self.image_size = int(image.get("size") or 0)
    self.min_crop = float(image.get("min_crop") or 1.0)
    mean, std = tuple(image.get("mean") or ()), tuple(image.get("std") or ())
    if not mean or not std:
      mean, std = ((self.found.mean, self.found.std) if self.init_from
                   else image_lib.normalisation(name))
    self.mean, self.std = mean, std
    self.train_preprocess = functools.partial(self.preprocess, train=True)
    self.eval_preprocess = functools.partial(self.preprocess, train=False)
    self._encode_text = jax.jit(functools.partial(self.model.apply,
                                                  method=self.model.encode_text))

  def _make_tokenizer(self, spec):
    kind = spec.get("kind") or "auto"
    length = int(spec.get("context_length") or 0) or self.max_text_len
    if length > self.max_text_len:
      raise ValueError(f"config.tokenizer.context_length={length} is longer than the "
                       f"model's {self.max_text_len} positions.")
    if kind == "auto":
      hf_folder = self.found is not None and self.found.kind != "open_clip"
      if hf_folder and not self.found.has_tokenizer():
        raise ValueError(f"{self.init_from} has no tokenizer mmjax reads (tokenizer.json, or "
                         f"vocab.json + merges.txt; SigLIP's spiece.model is not read): add "
                         f"one, or set --config.tokenizer.kind=byte (a smoke run's ids, "
                         f"meaningless to the model).")
      kind = "pretrained" if hf_folder else "byte"
    if kind == "pretrained":
      if self.found is None or self.found.kind == "open_clip":
        raise ValueError("config.tokenizer.kind='pretrained' reads a Hugging Face folder's "
                         "tokenizer: set config.init_from to one (for an open_clip file use "
                         "kind='bpe').")
      tok = self.found.tokenizer(length)
      vocab_size = tok.vocab_size
    elif kind == "byte":
      tok = tokenizer_lib.ByteTokenizer(max_len=length)
      vocab_size = tok.vocab_size
    elif kind == "bpe":
      if not spec.get("vocab"):
        raise ValueError("config.tokenizer.kind='bpe' needs config.tokenizer.vocab: the path "
                         "of CLIP's bpe_simple_vocab_16e6.txt.gz (in the open_clip package, "
                         "or tests/fixtures/clip/).")
      from mmjax.data import bpe  # pylint: disable=import-outside-toplevel
      tok = bpe.ClipTokenizer(spec["vocab"], context_length=length)
      vocab_size = tok.eot_id + 1
    else:
      raise ValueError(f"config.tokenizer.kind={kind!r}: use 'auto', 'byte', 'pretrained' or "
                       f"'bpe'.")
    if vocab_size > self.model.text_vocab_size:
      raise ValueError(f"The {kind} tokenizer's ids go up to {vocab_size - 1}, but the model's "
                       f"text vocabulary has {self.model.text_vocab_size} entries"
                       f"{' (from ' + self.init_from + ')' if self.init_from else ''}: use "
                       f"the tokenizer the model was trained with (config.tokenizer).")
    return tok

  def setup(self):
    super().setup()
    h, _, c = self.image_shape
    size = self.image_size or h
    channels = c
    if self.init_from:
      from mmjax.interop import open_clip  # pylint: disable=import-outside-toplevel
      from mmjax.interop import pretrained  # pylint: disable=import-outside-toplevel
      model_size = self.found.image_size
      if self.image_size and self.image_size != model_size:
        raise ValueError(f"config.image.size={self.image_size}, but {self.init_from} takes "
                         f"{model_size}x{model_size} images: set it to 0 or {model_size}.")
      size, channels = model_size, 3
      self.loaded_params = pretrained.load_pretrained(
          self.init_from, **open_clip.config_kwargs(self.config)).params
    self.model_image_shape = (size, size, channels)

  def preprocess(self, batch, train: bool):
    """Examples -> {"image": [b, size, size, c] normalised, "tokens", "label"}.

    "label" is the class with templated captions, else the example's position (its
    index in an evaluation split): each caption is relevant to its own image only.
    """
    size, _, channels = self.model_image_shape
    images = image_lib.crop_and_resize(
        batch["image"], size, positions=batch["position"] if train else None,
        seed=self.config.seed, min_fraction=self.min_crop if train else 1.0,
        channels=channels)
    if self.caption_source == "data":
      texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t)
               for t in batch["caption"].tolist()]
      labels = batch["position"]
    else:
      templates = self.train_templates if train else self.eval_templates
      ids = seeded.choice(batch["position"], len(templates), self.config.seed)
      texts = [templates[t].format(self.class_names[y])
               for y, t in zip(batch["label"].tolist(), ids.tolist())]
      labels = batch["label"]
    return {"image": image_lib.normalize(images, self.mean, self.std),
            "tokens": self.tokenizer.encode(texts), "label": labels.astype(np.int32)}

  # Model and loss.
  def pretrained(self):
    """With config.init_from, the file's parameters (read by setup)."""
    return (self.loaded_params, {}) if self.init_from else None

  def init(self, rng):
    """Random parameters (config.init_from: see `pretrained`)."""
    image = jnp.zeros((1, *self.model_image_shape), jnp.float32)
    tokens = jnp.zeros((1, self.max_text_len), jnp.int32)
    return self.model.init(rng, image, tokens)["params"], {}

  batch_coupled = True  # Every other pair of the global batch is a negative.

  def loss(self, params, extras, batch, rng):
    return self.loss_from_embeddings(params, extras,
                                     self.embed_for_loss(params, extras, batch, rng), rng)

  def embed_for_loss(self, params, extras, batch, rng):
    """{"image", "text"}: the batch's [b, embed_dim] unit embeddings, with dropout."""
    variables, rngs, m = {"params": params}, {"dropout": rng}, self.model
    return {"image": m.apply(variables, batch["image"], False, method=m.encode_image,
                             rngs=rngs),
            "text": m.apply(variables, batch["tokens"], False, method=m.encode_text,
                            rngs=rngs)}

  def loss_from_embeddings(self, params, extras, embeddings, rng):
    """The contrastive loss over the global batch's embeddings (split over the mesh)."""
    img, txt = embeddings["image"], embeddings["text"]
    scales = self.model.apply({"params": params}, method=self.model.scales)
    axes = parallel.batch_axes(self.mesh)
    if self.config.loss == "softmax":
      loss = losses.info_nce_sharded(img, txt, 1.0 / scales["logit_scale"], self.mesh, axes)
    else:
      loss = losses.sigmoid_contrastive_sharded(img, txt, jnp.log(scales["logit_scale"]),
                                                scales["logit_bias"], self.mesh, axes)
    # Both towers already return unit vectors; the losses normalise again (harmless).
    # In-batch accuracy: is each image's own caption its nearest among the global batch?
    nearest = jnp.argmax(img @ txt.T, axis=1)
    accuracy = jnp.mean(nearest == jnp.arange(img.shape[0]))
    return loss, ({"train/temperature": 1.0 / scales["logit_scale"],
                   "train/contrastive_accuracy": accuracy}, extras)

  # What the evaluators call.
  def embed(self, params, extras, batch):
    """A batch's (image embeddings [b, dim], caption embeddings [b, dim]), unit norm."""
    variables = {"params": params}
    return (self.model.apply(variables, batch["image"], method=self.model.encode_image),
            self.model.apply(variables, batch["tokens"], method=self.model.encode_text))

  def class_text_embeddings(self, params, extras) -> np.ndarray | None:
    """[classes, templates, dim] embeddings of every evaluation template of every class;
    None with captions from the data (no classes)."""
    if not self.class_names:
      return None
    templates = self.eval_templates
    texts = [t.format(name) for name in self.class_names for t in templates]
    emb = self._encode_text({"params": params}, jnp.asarray(self.tokenizer.encode(texts)))
    return np.asarray(emb).reshape(len(self.class_names), len(templates), -1)
