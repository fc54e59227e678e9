r"""Visual question answering on 2x2 grids of MNIST digits: an Idefics2-style model.

A ViT encodes each 28x28 cell of the 56x56 grid, a perceiver resampler pools each
cell to two tokens, an MLP projects them to the width of a small causal decoder that
reads them before the question's bytes and writes the answer ("what is in the top left?" -> "seven", "how
many sevens are there?" -> "two", "is there a seven?" -> "yes"). Only the answer's
tokens are in the loss. Evaluation: greedy answers (key/value cache) to questions in
phrasings held out from training, on `evals.vqa.num_grids` grids of the test split.

The ViT ("mu/4", mean-pooled, as in experiments/clip_mnist.py) starts at random, from
a CLIP run's image tower (`clip_workdir=...`), or from an open_clip / OpenAI ViT CLIP
file's (`--config.init_from=<.safetensors> --config.quick_gelu=...`: the file's sizes,
cells resized to its resolution; see the README's "Pretrained weights").

Commands:
  python launch.py --config=experiments/vqa_mnist.py --workdir=workdirs/vqa_mnist
  python launch.py --config=experiments/vqa_mnist.py:clip_workdir=workdirs/clip_mnist --workdir=workdirs/vqa_clip
  python launch.py --config=experiments/vqa_mnist.py:dataset=fashion_mnist --workdir=workdirs/vqa_fashion
  python launch.py --config=experiments/vqa_mnist.py:smoke --workdir=/tmp/vqa_smoke

Target (2-core CPU, under 30 minutes): eval/vqa_exact_match >= 0.90 on MNIST grids,
with eval/vqa_exact_match/{cell,count,presence} each reported, with the ViT of
experiments/clip_mnist.py frozen. The README's results table has the measured figures
(0.964 exact match).
"""
from mmjax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, dataset="mnist", clip_workdir="")
  c = configs.base_config()
  c.task = "vqa"
  c.dataset.name = arg.dataset

  # Idefics2's image splitting: each 28x28 cell is encoded by the ViT and pooled to
  # num_latents tokens on its own, so the decoder reads 4 x 2 image tokens in reading
  # order. The ViT is the one of experiments/clip_mnist.py ("mu/4", mean-pooled), so that
  # a CLIP run's image tower loads into it; random or loaded, the model is the same.
  c.model = dict(vision_variant="mu/4", vision_pool="gap", image_split=2, num_latents=2,
                 resampler_depth=1, width=128, depth=3, num_heads=4, mlp_dim=512)
  c.clip_workdir = arg.clip_workdir  # Empty: the ViT starts at random.
  # Or an open_clip / OpenAI ViT CLIP file's image tower: --config.init_from=<.safetensors>
  # (with --config.quick_gelu=...); its sizes replace vision_variant (not with clip_workdir).
  configs.open_clip_fields(c)
  # A ViT loaded from CLIP stays as it is: the step skips its backward pass (1.6x faster
  # steps), and the decoder learns to read digit features CLIP already made.
  c.frozen = ("vision/.*",) if arg.clip_workdir else ()
  c.max_question_len = 48  # BOS + the longest question's bytes (44), rounded up.
  c.max_answer_len = 12 if arg.dataset == "fashion_mnist" else 8  # The answer's bytes + EOS.
  c.kind_weights = (2.0, 1.0, 1.0)  # Training mix of cell, count and presence questions.

  configs.set_steps(c, batch=64, eval_batch=500, steps=4500, log_every=100, eval_every=2250,
                    checkpoint_every=500)
  configs.set_optimizer(c, "adamw", learning_rate=1e-3, warmup_steps=200, weight_decay=0.05,
                        grad_clip_norm=1.0)
  c.evals.vqa = dict(type="vqa", num_grids=1500)

  if arg.smoke:
    c.model.update(num_latents=1, width=32, depth=1, mlp_dim=64)
    configs.apply_smoke(c, steps=10, batch=16, eval_batch=24)
    c.evals.vqa.num_grids = 48
  return c
