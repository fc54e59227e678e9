r"""CLIP pretraining on captioned MNIST or Fashion-MNIST: a ViT and a text Transformer.

Each image is paired with its class name through a caption template ("a handwritten
digit seven", "a product photo of a sneaker"), one of 12, drawn per example; four other
templates are held out for evaluation. Loss: symmetric InfoNCE over the global batch
(`loss=sigmoid` for SigLIP's).

Commands:
  python launch.py --config=experiments/clip_mnist.py --workdir=workdirs/clip_mnist
  python launch.py --config=experiments/clip_mnist.py:dataset=fashion_mnist --workdir=workdirs/clip_fashion
  python launch.py --config=experiments/clip_mnist.py:smoke --workdir=/tmp/clip_smoke

Zero-shot classification and retrieval of open_clip weights, without training (a fresh
workdir: the loaded parameters are evaluated as step 0); without --eval_only the same
flags fine-tune them:
  python launch.py --config=experiments/clip_mnist.py --workdir=workdirs/clip_b32_zeroshot \
    --eval_only --config.init_from=ViT-B-32.safetensors --config.quick_gelu=True \
    --config.tokenizer.kind=bpe --config.tokenizer.vocab=bpe_simple_vocab_16e6.txt.gz

Expected results (2-core CPU, alone: MNIST under 10 minutes, Fashion-MNIST under 15):
eval/zeroshot_top1 >= 0.98 on MNIST and >= 0.88 on Fashion-MNIST, over the whole test
split with held-out templates. The README's results table has the measured figures
(MNIST: 0.9805 in 559 s).
"""
from mmjax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, dataset="mnist", loss="softmax")
  c = configs.base_config()
  c.task = "clip"
  c.dataset.name = arg.dataset
  c.loss = arg.loss
  # Pretrained weights, tokenizer, prompts, image size: empty/defaults train from scratch
  # with byte tokens on the images as stored (see mmjax/tasks/clip.py).
  configs.clip_fields(c)

  # The text tower only has to tell a few dozen captions apart: one layer is enough.
  # dropout_rate: attention and residual dropout in training (--config.model.dropout_rate);
  # patch_dropout: FLIP's share of image patches dropped in training.
  c.model = configs.clip_mnist_model()
  # 2500 steps: 10.7 epochs of 60,000 pairs.
  configs.set_steps(c, batch=256, eval_batch=1024, steps=2500, log_every=100,
                    eval_every=1250, checkpoint_every=500)
  configs.set_optimizer(c, "adamw", learning_rate=2e-3, warmup_steps=200, weight_decay=0.05,
                        grad_clip_norm=1.0)
  c.evals.zeroshot = dict(type="zeroshot_retrieval")  # Zero-shot top-1 and retrieval.

  if arg.smoke:
    configs.apply_smoke(c)
  return c
