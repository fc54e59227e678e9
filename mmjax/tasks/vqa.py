"""Visual question answering on 2x2 grids with an Idefics2-style vision-language model.

Training: next-token cross-entropy on the answer tokens only (the question and the
image are context). Evaluated by `evals.vqa` (greedy answers with a key/value cache,
exact match), through `generate`.

The ViT starts at random, from the image tower of a CLIP run (`clip_workdir`), or from
an open_clip / OpenAI ViT CLIP's (`init_from`: OpenAI's layout and the file's sizes,
each cell resized to its resolution; see grid.GridImages); `config.frozen =
("vision/.*",)` keeps it as loaded.
"""
import jax.numpy as jnp

from mmjax import losses
from mmjax.data import captions
from mmjax.data import tokenizer
from mmjax.data import vqa
from mmjax.models import vlm
from mmjax.tasks import base
from mmjax.tasks import grid


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


class VqaTask(base.Task):
  """Trains `vlm.VisionLanguageModel` to answer questions about grids of four images."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.images = grid.GridImages(config, "VQA")
    captions.check_dataset(config.dataset.name)
    self.class_names = captions.CLASS_NAMES[config.dataset.name]
    self.q_len = config.max_question_len
    self.a_len = config.max_answer_len
    need_q = longest_question(self.class_names) + 1  # + BOS.
    need_a = max(len(a) for a in (*self.class_names, *vqa.NUMBERS, "yes", "no")) + 1  # + EOS.
    if self.q_len < need_q or self.a_len < need_a:
      raise ValueError(f"config.max_question_len={self.q_len} and max_answer_len={self.a_len}: "
                       f"{config.dataset.name} needs at least {need_q} and {need_a}.")
    model = vlm.VisionLanguageModel(**{**config.model.to_dict(),
                                       **self.images.model_overrides},
                                    **base.model_options(config, "vqa"))
    self.model = model.clone(max_len=model.num_image_tokens + self.q_len + self.a_len)

  def setup(self):
    super().setup()
    c = self.config
    self.image_shape = self.images.grid_shape(self.image_shape)  # 2x2 training images.
    self.vision_params = grid.clip_image_tower(c.clip_workdir) if c.clip_workdir else None

  # Data.
  def _encode(self, images, labels, keys, templates, kinds=None):
    qa = vqa.questions(labels, keys, self.config.seed, self.class_names, templates, kinds,
                       tuple(self.config.kind_weights))
    return {"image": self.images(images),
            "prompt": vqa.encode_prompts(qa["question"], self.q_len),
            "answer": vqa.encode_answers(qa["answer"], self.a_len), "kind": qa["kind"]}

  def train_preprocess(self, batch):
    images, labels = vqa.train_grids(batch, self.train_source, self.config.seed)
    return self._encode(images, labels, batch["position"], vqa.TRAIN_TEMPLATES)

  def eval_preprocess(self, batch):
    """Grids ("image", "labels") -> held-out phrasings, each kind a third of the grids."""
    kinds = batch["position"] % len(vqa.KINDS)
    return self._encode(batch["image"], batch["labels"], batch["position"],
                        vqa.EVAL_TEMPLATES, kinds)

  # Model and loss.
  def pretrained(self):
    """With config.init_from: `init`'s parameters with the file's image tower as "vision"."""
    return self.images.pretrained(self.init)

  def init(self, rng):
    image = jnp.zeros((1, *self.image_shape), jnp.float32)
    tokens = jnp.zeros((1, self.q_len + self.a_len - 1), jnp.int32)
    params = self.model.init(rng, image, tokens, tokens > 0)["params"]
    if self.vision_params is not None:
      params = vlm.with_vision_params(params, self.vision_params)
    return params, {}

  def loss(self, params, extras, batch, rng):
    tokens = jnp.concatenate([batch["prompt"], batch["answer"]], axis=1)
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

  # What the evaluators call.
  def generate(self, params, extras, images, prompt):
    """images [b, H, W, C], prompt [b, q_len] -> greedy answers [b, a_len] (KV cache)."""
    return vlm.greedy_generate(self.model, params, images, prompt, self.a_len)
