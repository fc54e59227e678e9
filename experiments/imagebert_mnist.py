r"""ImageBERT on 2x2 grids of MNIST digits: one Transformer over image regions and caption bytes.

ImageBERT reads the regions a pretrained detector finds; here the regions are the grid's
four cells, each encoded by the ViT of experiments/clip_mnist.py ("mu/4", mean-pooled)
to one token. The sequence is `[CLS] 4 region tokens [SEP] caption bytes`, each token
summed with a position and a segment (modality) embedding. Training mixes image-text
matching (the grid's caption, "a seven, a two, a nine and an eight", or a mismatched
one) and masked byte prediction on own captions. Evaluation on `evals.itm.num_grids`
test-split grids, own and mismatched captions alternating. The ViT starts at random, from
a CLIP run's image tower (`clip_workdir=...`), as ImageBERT's detector is pretrained, or
from an open_clip / OpenAI ViT CLIP file's (`--config.init_from=<.safetensors>
--config.quick_gelu=...`; see the README's "Pretrained weights").

Commands:
  python launch.py --config=experiments/imagebert_mnist.py:clip_workdir=workdirs/clip_mnist --workdir=workdirs/imagebert_clip
  python launch.py --config=experiments/imagebert_mnist.py --workdir=workdirs/imagebert_mnist
  python launch.py --config=experiments/imagebert_mnist.py:dataset=fashion_mnist --workdir=workdirs/imagebert_fashion
  python launch.py --config=experiments/imagebert_mnist.py:smoke --workdir=/tmp/imagebert_smoke

Target (2-core CPU, under 30 minutes): eval/itm_accuracy >= 0.95 on MNIST grids
(eval/mlm_accuracy is reported too), with the CLIP tower frozen. The README's results
table has the measured figures (ITM 0.984, MLM 0.999).
"""
from mmjax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, dataset="mnist", clip_workdir="")
  c = configs.base_config()
  c.task = "imagebert"
  c.dataset.name = arg.dataset

  # 2 + 4 regions + 44 caption bytes = 50 tokens. (vision_variant=None gives the 64
  # linear patch embeddings of 7x7 patches instead: a run of those stayed at chance ITM
  # accuracy for its first 400 steps.)
  c.model = dict(vision_variant="mu/4", vision_pool="gap", image_split=2,
                 width=128, depth=4, num_heads=4, mlp_dim=512)
  c.clip_workdir = arg.clip_workdir  # Empty: the ViT starts at random.
  # Or an open_clip / OpenAI ViT CLIP file's image tower: --config.init_from=<.safetensors>
  # (with --config.quick_gelu=...); its sizes replace vision_variant (not with clip_workdir).
  configs.open_clip_fields(c)
  # A ViT loaded from CLIP stays as it is (ImageBERT's detector is fixed too): the step
  # skips its backward pass, and its digit features are already there.
  c.frozen = ("vision/.*",) if arg.clip_workdir else ()
  c.max_text_len = 64 if arg.dataset == "fashion_mnist" else 44  # BOS + caption + EOS.
  c.mlm_fraction = 0.25  # Share of training examples that are MLM (own caption, masked).
  c.mlm_rate = 0.15  # Share of an MLM caption's bytes replaced by [MASK].
  c.mlm_loss_weight = 1.0
  c.itm_hard_fraction = 0.25  # Share of negatives that change one cell's class only.

  configs.set_steps(c, batch=64, eval_batch=500, steps=4000, log_every=100, eval_every=2000,
                    checkpoint_every=500)
  configs.set_optimizer(c, "adamw", learning_rate=1e-3, warmup_steps=200, weight_decay=0.05,
                        grad_clip_norm=1.0)
  c.evals.itm = dict(type="itm", num_grids=2000)

  if arg.smoke:
    c.model.update(width=32, depth=1, mlp_dim=64)
    configs.apply_smoke(c, steps=10, batch=16, eval_batch=24)
    c.evals.itm.num_grids = 48
  return c
