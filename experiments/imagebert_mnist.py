r"""ImageBERT on 2x2 grids of MNIST digits: one Transformer over image patches and caption bytes.

The sequence is `[CLS] 64 patch embeddings [SEP] caption bytes`, each token summed with
a position and a segment (modality) embedding. Training mixes image-text matching (the
grid's caption, "a seven, a two, a nine and an eight", or a mismatched one) and masked
byte prediction on own captions. Evaluation on `num_eval_grids` test-split grids, own
and mismatched captions alternating.

Commands:
  python launch.py --config=experiments/imagebert_mnist.py --workdir=workdirs/imagebert_mnist
  python launch.py --config=experiments/imagebert_mnist.py:dataset=fashion_mnist --workdir=workdirs/imagebert_fashion
  python launch.py --config=experiments/imagebert_mnist.py:smoke --workdir=/tmp/imagebert_smoke

Target (2-core CPU, under 30 minutes): eval/itm_accuracy >= 0.95 on MNIST grids
(eval/mlm_accuracy is reported too). Not yet measured to the end: a run stopped at step
400 still had image-text matching at chance (see the README).
"""
from mmjax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, dataset="mnist")
  c = configs.base_config()
  c.task = "imagebert"
  c.dataset.name = arg.dataset

  # 2 + 64 patches + 44 caption bytes = 110 tokens: a narrow encoder keeps a step CPU-sized.
  c.model = dict(patch=7, width=64, depth=4, num_heads=4, mlp_dim=256)
  c.max_text_len = 64 if arg.dataset == "fashion_mnist" else 44  # BOS + caption + EOS.
  c.mlm_fraction = 0.25  # Share of training examples that are MLM (own caption, masked).
  c.mlm_rate = 0.15  # Share of an MLM caption's bytes replaced by [MASK].
  c.mlm_loss_weight = 1.0
  c.itm_hard_fraction = 0.25  # Share of negatives that change one cell's class only.
  c.num_eval_grids = 2000

  c.global_batch_size = 64
  c.eval_batch_size = 500
  c.num_train_steps = 3000
  c.log_every_steps = 100
  c.eval_every_steps = 1500
  c.checkpoint_every_steps = 500
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 1.0

  if arg.smoke:
    c.model.update(width=32, depth=1, mlp_dim=64)
    c.global_batch_size = 16
    c.num_train_steps = 10
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 5
    c.num_eval_grids = 48
    c.eval_batch_size = 24
    c.optimizer.warmup_steps = 2
  return c
