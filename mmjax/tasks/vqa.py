"""Visual question answering on 2x2 grids with an Idefics2-style vision-language model.

Training: next-token cross-entropy on the answer tokens only (the question and the
image are context). Evaluation: greedy answers with a key/value cache on a fixed set of
`num_eval_grids` test-split grids, one question each (kinds in turn), phrased with
templates never seen in training; exact string match overall and per kind.

The ViT starts at random, or from the image tower of a CLIP run (`clip_workdir`).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import losses
from mmjax.data import captions
from mmjax.data import pipeline
from mmjax.data import tokenizer
from mmjax.data import vqa
from mmjax.models import vlm
from mmjax.tasks.classify import NORMALISATION
from mmjax.train import sharding as sharding_lib
from mmjax.train import trainer

EVAL_GRID_SEED = 0  # The evaluation grids are the same whatever the run's seed.


def longest_question(class_names: tuple[str, ...]) -> int:
  """Bytes of the longest question any template can ask about these classes."""
  longest = 0
  for templates in (vqa.TRAIN_TEMPLATES, vqa.EVAL_TEMPLATES):
    for template in sum(templates.values(), ()):
      for cell in vqa.CELLS:
        for name in class_names:
          text = template.format(cell=cell, name=name, a_name=vqa.article(name),
                                 plural=vqa.plural(name))
          longest = max(longest, len(text.encode("utf-8")))
  return longest


def load_clip_image_tower(workdir: str):
  """The ViT parameters ("image_tower") of the CLIP run in `workdir`, latest checkpoint."""
  params = trainer.restore_state(workdir)["params"]
  if "image_tower" not in params:
    raise ValueError(f"The checkpoint in {workdir} has no 'image_tower' parameters (top-level "
                     f"keys: {sorted(params)}); clip_workdir must be a CLIP run's workdir.")
  return jax.device_get(params["image_tower"])


class VqaTask:
  """Trains `vlm.VisionLanguageModel` to answer questions about grids of four images."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    captions.check_dataset(config.dataset.name)
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    self.config = config
    self.mesh = mesh
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    self.q_len = config.max_question_len
    self.a_len = config.max_answer_len
    need_q = longest_question(self.class_names) + 1  # + BOS.
    need_a = max(len(a) for a in (*self.class_names, *vqa.NUMBERS, "yes", "no")) + 1  # + EOS.
    if self.q_len < need_q or self.a_len < need_a:
      raise ValueError(f"config.max_question_len={self.q_len} and max_answer_len={self.a_len}: "
                       f"{config.dataset.name} needs at least {need_q} and {need_a}.")
    model = vlm.VisionLanguageModel(**config.model.to_dict())
    self.model = model.clone(max_len=model.num_image_tokens + self.q_len + self.a_len)
    self.mean, self.std = NORMALISATION.get(config.dataset.name, (0.5, 0.5))
    self.train_source = pipeline.load_source(config.dataset, config.dataset.train_split)
    self.eval_source = vqa.GridSource(
        pipeline.load_source(config.dataset, config.dataset.eval_split),
        config.num_eval_grids, seed=EVAL_GRID_SEED)
    self.vision_params = (load_clip_image_tower(config.clip_workdir)
                          if config.clip_workdir else None)
    self._generate = jax.jit(self._generate_batch, out_shardings=sharding_lib.replicated(mesh))

  # Data.
  def _encode(self, images, labels, keys, templates, kinds=None):
    qa = vqa.questions(labels, keys, self.config.seed, self.class_names, templates, kinds,
                       tuple(self.config.kind_weights))
    tokens = np.concatenate([vqa.encode_prompts(qa["question"], self.q_len),
                             vqa.encode_answers(qa["answer"], self.a_len)], axis=1)
    image = pipeline.normalize_images(images, self.mean, self.std)
    return {"image": image, "tokens": tokens, "kind": qa["kind"]}

  def _train_preprocess(self, batch):
    images, labels = vqa.train_grids(batch, self.train_source, self.config.seed)
    return self._encode(images, labels, batch["position"], vqa.TRAIN_TEMPLATES)

  def _eval_preprocess(self, batch):
    kinds = batch["position"] % len(vqa.KINDS)  # Each kind a third of the grids.
    return self._encode(batch["image"], batch["labels"], batch["position"],
                        vqa.EVAL_TEMPLATES, kinds)

  def train_dataset(self, sharding: pipeline.Sharding):
    return pipeline.train_dataset(
        self.train_source, global_batch_size=self.config.global_batch_size,
        seed=self.config.seed, sharding=sharding, preprocess=self._train_preprocess)

  # Model and loss.
  def init(self, rng):
    image = jnp.zeros((1, 56, 56, 1), jnp.float32)
    tokens = jnp.zeros((1, self.q_len + self.a_len - 1), jnp.int32)
    params = self.model.init(rng, image, tokens, tokens > 0)["params"]
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
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = self.model.apply({"params": params}, batch["image"], inputs,
                              inputs != tokenizer.PAD)
    # Only the answer counts: targets at index >= q_len - 1 are the answer's tokens and EOS.
    in_answer = jnp.arange(targets.shape[1]) >= self.q_len - 1
    weights = (in_answer[None, :] & (targets != tokenizer.PAD)).astype(jnp.float32)
    ce = losses.softmax_cross_entropy(logits, targets)
    loss = jnp.sum(ce * weights) / jnp.sum(weights)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    token_accuracy = jnp.sum(correct * weights) / jnp.sum(weights)
    answer_correct = jnp.all((correct > 0) | (weights == 0), axis=1)
    return loss, ({"train/answer_token_accuracy": token_accuracy,
                   "train/answer_accuracy": jnp.mean(answer_correct)}, extras)

  # Evaluation.
  def _generate_batch(self, params, batch):
    prompt = batch["tokens"][:, :self.q_len]
    answers = vlm.greedy_generate(self.model, params, batch["image"], prompt, self.a_len)
    return answers, batch["tokens"][:, self.q_len:], batch["kind"], batch["mask"]

  def evaluate(self, state) -> dict[str, float]:
    dataset = pipeline.eval_dataset(
        self.eval_source, global_batch_size=self.config.eval_batch_size,
        sharding=pipeline.Sharding(jax.process_index(), jax.process_count()),
        preprocess=self._eval_preprocess)
    correct, kinds = [], []
    for local in dataset:
      batch = sharding_lib.global_batch(local, self.mesh)
      predicted, truth, kind, mask = map(np.asarray, self._generate(state.params, batch))
      keep = mask > 0
      same = [p == t for p, t in zip(vqa.decode_answers(predicted[keep]),
                                     vqa.decode_answers(truth[keep]))]
      correct.append(np.asarray(same, np.float64))
      kinds.append(kind[keep])
    correct, kinds = np.concatenate(correct), np.concatenate(kinds)
    metrics = {"eval/vqa_exact_match": float(np.mean(correct))}
    for i, name in enumerate(vqa.KINDS):
      if np.any(kinds == i):
        metrics[f"eval/vqa_exact_match/{name}"] = float(np.mean(correct[kinds == i]))
    return metrics
