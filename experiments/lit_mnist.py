r"""LiT (locked-image tuning) on captioned MNIST: a CLIP run's image tower, locked, and
a text tower trained from scratch against it.

The image tower and its projection start from the latest checkpoint of a CLIP run
(`clip_workdir`, e.g. experiments/clip_mnist.py's; the model config here is that
one's) and are frozen (`config.frozen`: no gradient, no optimizer state); the text
tower, its projection and the temperature start from random and train with the
contrastive loss (`loss=softmax`, InfoNCE, or `loss=sigmoid`, SigLIP's) over the
global batch. Or from an open_clip file (`--config.init_from=...`, with its
tokenizer flags as in experiments/clip_mnist.py): its image tower locked, its text
tower re-initialised (`text=loaded` keeps and fine-tunes the file's).

Commands:
  python launch.py --config=experiments/clip_mnist.py --workdir=workdirs/clip_mnist
  python launch.py --config=experiments/lit_mnist.py:clip_workdir=workdirs/clip_mnist \
    --workdir=workdirs/lit_mnist
  python launch.py --config=experiments/lit_mnist.py:smoke,clip_workdir=/tmp/clip_smoke \
    --workdir=/tmp/lit_smoke

Expected result: eval/zeroshot_top1 >= 0.97 on MNIST's test split (held-out templates)
from the first evaluation on: 0.9806 at step 250 (a tenth of the CLIP run's 2,500 steps)
and 0.9808 at step 1,000, from a CLIP run at 0.9806 (docs/lora.md).
"""
from mmjax import configs

LOCKED = ("image_tower/.*", "image_proj/.*")
TEXT = ("text_tower/.*", "text_proj/.*")


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, dataset="mnist", loss="softmax", clip_workdir="",
                          text="scratch")
  if arg.text not in ("scratch", "loaded"):
    raise ValueError(f"lit_mnist: text={arg.text!r}: use 'scratch' or 'loaded'.")
  c = configs.base_config()
  c.task = "clip"
  c.dataset.name = arg.dataset
  c.loss = arg.loss
  configs.clip_fields(c)

  # experiments/clip_mnist.py's model: the image tower must have its shapes.
  c.model = configs.clip_mnist_model()
  # The locked tower: from the CLIP run's workdir (or config.init_from's file, whose text
  # tower then restarts from random unless text=loaded).
  c.warm_start.workdir = arg.clip_workdir
  c.warm_start.include = LOCKED
  c.warm_start.reinit = TEXT if not arg.clip_workdir and arg.text == "scratch" else ()
  c.frozen = LOCKED

  c.global_batch_size = 256
  c.eval_batch_size = 1024
  c.num_train_steps = 1000
  c.log_every_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 500
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 1.0
  c.evals.zeroshot = dict(type="zeroshot_retrieval")

  if arg.smoke:
    configs.apply_smoke(c)
  return c
