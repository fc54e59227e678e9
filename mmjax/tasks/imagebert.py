"""ImageBERT pretraining on captioned 2x2 grids: image-text matching and masked bytes.

Each training example is one of two kinds, drawn per example:
- image-text matching (ITM), a share 1 - mlm_fraction: the grid with its own caption
  or, half the time, a mismatched one ("a seven, a two, ..." of another grid, or, for
  `itm_hard_fraction` of the negatives, the true caption with one cell's class
  changed); sigmoid cross-entropy on the [CLS] logit;
- masked language modelling (MLM), mlm_fraction: the grid's own caption with
  `mlm_rate` of its bytes replaced by [MASK]; cross-entropy on those bytes.
ITM examples never contain [MASK], so the mask cannot give the answer away.

With a ViT for region features (`config.model.vision_variant`), the ViT starts at random,
from a CLIP run's image tower (`config.clip_workdir`) or from an open_clip / OpenAI ViT
CLIP's (`config.init_from`), as in the VQA task;
`config.frozen = ("vision/.*",)` keeps it as loaded (as ImageBERT keeps its detector
fixed).

Evaluated by `evals.itm` on fixed test-split grids (ITM accuracy with own and
mismatched captions alternating, MLM accuracy on the own captions, masked by a fixed
hash), through `eval_preprocess` and `predict`.
"""
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import losses
from mmjax.data import captions
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import vqa
from mmjax.models import imagebert
from mmjax.models import vlm
from mmjax.tasks import base
from mmjax.tasks import grid

_MLM_CHOICE = 101  # Hash stream: is a training example an MLM one?


class ImageBertTask(base.Task):
  """Trains `imagebert.ImageBERT` with ITM and MLM on grids of four images."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.images = grid.GridImages(config, "ImageBERT")
    captions.check_dataset(config.dataset.name)
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    longest = max(self.class_names, key=lambda n: len(vqa.article(n)))
    need = len(vqa.caption([longest] * 4).encode("utf-8")) + 2  # + BOS, EOS.
    if config.max_text_len < need:
      raise ValueError(f"config.max_text_len={config.max_text_len}: {config.dataset.name} "
                       f"captions need {need}.")
    self.tokenizer = tokenizer_lib.ByteTokenizer(config.max_text_len)
    field = "clip_workdir" if config.clip_workdir else "init_from"
    if config.get(field) and config.model.get("vision_variant") is None:
      raise ValueError(f"config.{field} needs a ViT: set config.model.vision_variant "
                       f"(e.g. 'mu/4'; with init_from the file's sizes replace it).")
    self.model = imagebert.ImageBERT(**{**config.model.to_dict(),
                                        **self.images.model_overrides},
                                     **base.model_options(config, "imagebert"))

  def setup(self):
    super().setup()
    c = self.config
    self.image_shape = self.images.grid_shape(self.image_shape)  # 2x2 training images.
    n_image = self.model.num_image_tokens(*self.image_shape[:2])
    self.model = self.model.clone(max_len=2 + n_image + c.max_text_len)
    self.vision_params = grid.clip_image_tower(c.clip_workdir) if c.clip_workdir else None

  # Data.
  def _mask(self, tokens, keys, rows):
    """tokens [b, T] -> (tokens with [MASK] where masked in `rows`, weights [b, T])."""
    masked = vqa.mlm_mask(tokens, keys, self.config.seed, self.config.mlm_rate) & rows[:, None]
    return np.where(masked, imagebert.MASK, tokens).astype(np.int32), masked.astype(np.float32)

  def train_preprocess(self, batch):
    c = self.config
    keys = batch["position"]
    images, labels = vqa.train_grids(batch, self.train_source, c.seed)
    is_mlm = vqa.uniform(keys, c.seed, _MLM_CHOICE) < c.mlm_fraction
    match = is_mlm | (vqa.draw(keys, 2, c.seed, _MLM_CHOICE + 1) == 1)
    texts, match = vqa.matching_captions(labels, keys, c.seed, self.class_names,
                                         c.itm_hard_fraction, match)
    targets = self.tokenizer.encode(texts)
    tokens, mlm_weight = self._mask(targets, keys, is_mlm)
    image = self.images(images)
    return {"image": image, "tokens": tokens, "targets": targets, "match": match,
            "itm_weight": (~is_mlm).astype(np.float32), "mlm_weight": mlm_weight}

  def eval_preprocess(self, batch):
    """Grids -> own captions (even positions) and mismatched ones (odd), and the own
    captions masked for MLM ("mlm_tokens", "mlm_weight")."""
    keys = batch["position"]
    own = keys % 2 == 0
    texts, match = vqa.matching_captions(batch["labels"], keys, self.config.seed,
                                         self.class_names, self.config.itm_hard_fraction, own)
    tokens = self.tokenizer.encode(texts)
    mlm_tokens, mlm_weight = self._mask(tokens, keys, own)
    image = self.images(batch["image"])
    return {"image": image, "tokens": tokens, "targets": tokens, "match": match,
            "mlm_tokens": mlm_tokens, "mlm_weight": mlm_weight}

  # Model and loss.
  def pretrained(self):
    """With config.init_from: `init`'s parameters with the file's image tower as "vision"."""
    return self.images.pretrained(self.init)

  def init(self, rng):
    image = jnp.zeros((1, *self.image_shape), jnp.float32)
    tokens = jnp.zeros((1, self.config.max_text_len), jnp.int32)
    params = self.model.init(rng, image, tokens)["params"]
    if self.vision_params is not None:
      params = vlm.with_vision_params(params, self.vision_params)
    return params, {}

  def loss(self, params, extras, batch, rng):
    out = self.predict(params, extras, batch["image"], batch["tokens"])
    itm_w, mlm_w = batch["itm_weight"], batch["mlm_weight"]
    itm = optax.sigmoid_binary_cross_entropy(out["itm_logit"], batch["match"])
    itm_loss = jnp.sum(itm * itm_w) / jnp.maximum(jnp.sum(itm_w), 1.0)
    mlm = losses.softmax_cross_entropy(out["mlm_logits"], batch["targets"])
    mlm_loss = jnp.sum(mlm * mlm_w) / jnp.maximum(jnp.sum(mlm_w), 1.0)
    itm_correct = ((out["itm_logit"] > 0) == (batch["match"] > 0)).astype(jnp.float32)
    mlm_correct = (jnp.argmax(out["mlm_logits"], -1) == batch["targets"]).astype(jnp.float32)
    metrics = {
        "train/itm_loss": itm_loss, "train/mlm_loss": mlm_loss,
        "train/itm_accuracy": jnp.sum(itm_correct * itm_w) / jnp.maximum(jnp.sum(itm_w), 1.0),
        "train/mlm_accuracy": jnp.sum(mlm_correct * mlm_w) / jnp.maximum(jnp.sum(mlm_w), 1.0)}
    return itm_loss + self.config.mlm_loss_weight * mlm_loss, (metrics, extras)

  # What the evaluators call.
  def predict(self, params, extras, images, tokens):
    """images [b, H, W, C], tokens [b, T] -> {"itm_logit": [b], "mlm_logits": [b, T, V]}."""
    return self.model.apply({"params": params}, images, tokens)
