"""ImageBERT pretraining on captioned 2x2 grids: image-text matching and masked bytes.

Each training example is one of two kinds, drawn per example:
- image-text matching (ITM), a share 1 - mlm_fraction: the grid with its own caption
  or, half the time, a mismatched one ("a seven, a two, ..." of another grid, or, for
  `itm_hard_fraction` of the negatives, the true caption with one cell's class
  changed); sigmoid cross-entropy on the [CLS] logit;
- masked language modelling (MLM), mlm_fraction: the grid's own caption with
  `mlm_rate` of its bytes replaced by [MASK]; cross-entropy on those bytes.
ITM examples never contain [MASK], so the mask cannot give the answer away.

With a ViT for region features (`config.model.vision_variant`), the ViT starts at random
or from a CLIP run's image tower (`config.clip_workdir`), as in the VQA task;
`config.freeze_vision` keeps it as loaded (as ImageBERT keeps its detector fixed).

Evaluation on `num_eval_grids` test-split grids: ITM accuracy with own and mismatched
captions alternating, and MLM accuracy on the own captions, masked by a fixed hash.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import losses
from mmjax.data import captions
from mmjax.data import pipeline
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.data import vqa
from mmjax.evals import common
from mmjax.models import imagebert
from mmjax.models import vlm
from mmjax.tasks.classify import NORMALISATION
from mmjax.tasks.vqa import load_clip_image_tower
from mmjax.train import sharding as sharding_lib

EVAL_GRID_SEED = 0  # The evaluation grids are the same whatever the run's seed.
_MLM_CHOICE = 101  # Hash stream: is a training example an MLM one?


class ImageBertTask:
  """Trains `imagebert.ImageBERT` with ITM and MLM on grids of four images."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    captions.check_dataset(config.dataset.name)
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    self.config = config
    self.mesh = mesh
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    longest = max(self.class_names, key=lambda n: len(vqa.article(n)))
    need = len(vqa.caption([longest] * 4).encode("utf-8")) + 2  # + BOS, EOS.
    if config.max_text_len < need:
      raise ValueError(f"config.max_text_len={config.max_text_len}: {config.dataset.name} "
                       f"captions need {need}.")
    self.tokenizer = tokenizer_lib.ByteTokenizer(config.max_text_len)
    model = imagebert.ImageBERT(**config.model.to_dict())
    self.model = model.clone(max_len=2 + model.num_image_tokens(56, 56) + config.max_text_len)
    if (config.clip_workdir or config.freeze_vision) and model.vision_variant is None:
      raise ValueError("config.clip_workdir and config.freeze_vision need a ViT: set "
                       "config.model.vision_variant (e.g. 'mu/4', the CLIP run's variant).")
    self.mean, self.std = NORMALISATION.get(config.dataset.name, (0.5, 0.5))
    self.train_source = pipeline.load_source(config.dataset, config.dataset.train_split)
    self.eval_source = vqa.GridSource(
        pipeline.load_source(config.dataset, config.dataset.eval_split),
        config.num_eval_grids, seed=EVAL_GRID_SEED)
    self.vision_params = (load_clip_image_tower(config.clip_workdir)
                          if config.clip_workdir else None)
    self._eval_sums = jax.jit(self._batch_sums)

  # Data.
  def _mask(self, tokens, keys, rows):
    """tokens [b, T] -> (tokens with [MASK] where masked in `rows`, weights [b, T])."""
    masked = vqa.mlm_mask(tokens, keys, self.config.seed, self.config.mlm_rate) & rows[:, None]
    return np.where(masked, imagebert.MASK, tokens).astype(np.int32), masked.astype(np.float32)

  def _train_preprocess(self, batch):
    c = self.config
    keys = batch["position"]
    images, labels = vqa.train_grids(batch, self.train_source, c.seed)
    is_mlm = vqa.uniform(keys, c.seed, _MLM_CHOICE) < c.mlm_fraction
    match = is_mlm | (vqa.draw(keys, 2, c.seed, _MLM_CHOICE + 1) == 1)
    texts, match = vqa.matching_captions(labels, keys, c.seed, self.class_names,
                                         c.itm_hard_fraction, match)
    targets = self.tokenizer.encode(texts)
    tokens, mlm_weight = self._mask(targets, keys, is_mlm)
    image = pipeline.normalize_images(images, self.mean, self.std)
    return {"image": image, "tokens": tokens, "targets": targets, "match": match,
            "itm_weight": (~is_mlm).astype(np.float32), "mlm_weight": mlm_weight}

  def _eval_preprocess(self, batch):
    keys = batch["position"]
    own = keys % 2 == 0
    texts, match = vqa.matching_captions(batch["labels"], keys, self.config.seed,
                                         self.class_names, self.config.itm_hard_fraction, own)
    tokens = self.tokenizer.encode(texts)
    mlm_tokens, mlm_weight = self._mask(tokens, keys, own)
    image = pipeline.normalize_images(batch["image"], self.mean, self.std)
    return {"image": image, "tokens": tokens, "targets": tokens, "match": match,
            "mlm_tokens": mlm_tokens, "mlm_weight": mlm_weight}

  def train_dataset(self, sharding: pipeline.Sharding):
    return pipeline.train_dataset(
        self.train_source, global_batch_size=self.config.global_batch_size,
        seed=self.config.seed, sharding=sharding, preprocess=self._train_preprocess)

  # Model and loss.
  def init(self, rng):
    image = jnp.zeros((1, 56, 56, 1), jnp.float32)
    tokens = jnp.zeros((1, self.config.max_text_len), jnp.int32)
    params = self.model.init(rng, image, tokens)["params"]
    if self.vision_params is not None:
      params = vlm.with_vision_params(params, self.vision_params)
    return params, {}

  def weight_decay_mask(self, params):
    mask = jax.tree.map(lambda x: x.ndim >= 2, params)
    if self.config.freeze_vision:
      mask["vision"] = jax.tree.map(lambda _: False, mask["vision"])
    return mask

  def loss(self, params, extras, batch, rng):
    if self.config.freeze_vision:
      params = {**params, "vision": jax.lax.stop_gradient(params["vision"])}
    out = self.model.apply({"params": params}, batch["image"], batch["tokens"])
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

  # Evaluation.
  def _batch_sums(self, params, batch):
    variables = {"params": params}
    mask = batch["mask"]
    logit = self.model.apply(variables, batch["image"], batch["tokens"])["itm_logit"]
    itm_correct = ((logit > 0) == (batch["match"] > 0)).astype(jnp.float32)
    itm = optax.sigmoid_binary_cross_entropy(logit, batch["match"])
    mlm_logits = self.model.apply(variables, batch["image"], batch["mlm_tokens"])["mlm_logits"]
    mlm_w = batch["mlm_weight"] * mask[:, None]
    mlm_correct = (jnp.argmax(mlm_logits, -1) == batch["targets"]).astype(jnp.float32)
    return {"itm_correct": jnp.sum(itm_correct * mask), "itm_loss": jnp.sum(itm * mask),
            "count": jnp.sum(mask), "mlm_correct": jnp.sum(mlm_correct * mlm_w),
            "mlm_count": jnp.sum(mlm_w)}

  def evaluate(self, state) -> dict[str, float]:
    dataset = pipeline.eval_dataset(
        self.eval_source, global_batch_size=self.config.eval_batch_size,
        sharding=pipeline.Sharding(jax.process_index(), jax.process_count()),
        preprocess=self._eval_preprocess)
    t = common.sum_over_batches(functools.partial(self._eval_sums, state.params), dataset,
                                self.mesh)
    return {"eval/itm_accuracy": t["itm_correct"] / t["count"],
            "eval/itm_loss": t["itm_loss"] / t["count"],
            "eval/mlm_accuracy": t["mlm_correct"] / max(t["mlm_count"], 1.0)}
