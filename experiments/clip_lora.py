r"""LoRA on CLIP: a CLIP MNIST run adapted to captioned Fashion-MNIST.

Every parameter starts from the latest checkpoint of a CLIP run (`clip_workdir`,
experiments/clip_mnist.py's; the model config here is that one's) and stays frozen;
low-rank adapters (mmjax/lora.py) beside the attention projections (query, key, value,
out) of both towers train with the contrastive loss on Fashion-MNIST's captions
("a product photo of a sneaker", ...). `targets=attention_mlp` adapts the towers' MLP
kernels too, `targets=attention_mlp_proj` also the projections into the joint space,
`targets=attention_mlp_proj_patch` also the patch embedding, `..._tokens` also the
text tower's token embedding table (rank=2 with any of these keeps the trained share
under 5%); `train_norms=True` trains the LayerNorms and the
temperature in full beside the adapters (config.lora.train, PEFT's modules_to_save). The line "Training N of M
parameters" gives the trained share; tools/checkpoint_bytes.py the optimizer state's
size in the checkpoint against a full training run's.

Commands:
  python launch.py --config=experiments/clip_mnist.py --workdir=workdirs/clip_mnist
  python launch.py --config=experiments/clip_lora.py:clip_workdir=workdirs/clip_mnist \
    --workdir=workdirs/clip_lora
  python launch.py --workdir=workdirs/clip_lora_amp --config.optimizer.learning_rate=5e-3 \
    --config=experiments/clip_lora.py:clip_workdir=workdirs/clip_mnist,targets=attention_mlp_proj,rank=2
  python launch.py --config=experiments/clip_lora.py:smoke,clip_workdir=/tmp/clip_smoke \
    --workdir=/tmp/clip_lora_smoke
  python tools/checkpoint_bytes.py workdirs/clip_mnist workdirs/clip_lora

Expected result (eval/zeroshot_top1 on Fashion-MNIST's test split, held-out templates,
from a CLIP MNIST run at 0.98): about 0.69 after the 600 steps with the default
attention adapters (3.3% of the parameters trained), about 0.76 with
`targets=attention_mlp_proj,rank=2 --config.optimizer.learning_rate=5e-3` (3.9%), 0.77
with `targets=attention_mlp_proj_patch` (4.0%), 0.82 with `targets=...patch_tokens` and
`--config.num_train_steps=1800` (4.5%); training from scratch reaches 0.89. The optimizer state is 3.4% of full training's.
docs/lora.md has the measured figures.
"""
from mmjax import configs

ATTENTION = (".*_tower/.*/attention/(query|key|value|out)/kernel",)
MLP = (".*_tower/.*/mlp/fc[12]/kernel",)
PROJECTIONS = ("(image|text)_proj/kernel",)
PATCHES = ("image_tower/embedding/kernel",)  # The patch embedding: a 4x4 conv, as [16, width].
TOKENS = ("text_tower/token_embedding/embedding",)  # The byte embedding table [vocab, width].
# lora.train: base parameters trained in full beside the adapters (PEFT's modules_to_save).
NORMS = (r".*/ln[^/]*/(scale|bias)", "logit_scale")  # LayerNorms and the temperature.
TARGETS = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP,
           "attention_mlp_proj": ATTENTION + MLP + PROJECTIONS,
           "attention_mlp_proj_patch": ATTENTION + MLP + PROJECTIONS + PATCHES,
           "attention_mlp_proj_patch_tokens": ATTENTION + MLP + PROJECTIONS + PATCHES + TOKENS}


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, dataset="fashion_mnist", loss="softmax",
                          clip_workdir="", rank=4, targets="attention", train_norms=False)
  if arg.targets not in TARGETS:
    raise ValueError(f"clip_lora: targets={arg.targets!r}: use one of {sorted(TARGETS)}.")
  c = configs.base_config()
  c.task = "clip"
  c.dataset.name = arg.dataset
  c.loss = arg.loss
  configs.clip_fields(c)

  # experiments/clip_mnist.py's model: the warm start needs its shapes.
  c.model = configs.clip_mnist_model()
  c.warm_start.workdir = arg.clip_workdir
  c.lora = dict(rank=arg.rank, alpha=2.0 * arg.rank, targets=TARGETS[arg.targets],
                dropout=0.0, train=NORMS if arg.train_norms else ())

  # 600 steps: 2.6 epochs of Fashion-MNIST's 60,000 pairs.
  configs.set_steps(c, batch=256, eval_batch=1024, steps=600, log_every=50,
                    eval_every=200, checkpoint_every=200)
  configs.set_optimizer(c, "adamw", learning_rate=3e-3, warmup_steps=50, weight_decay=0.0,
                        grad_clip_norm=1.0)
  c.evals.zeroshot = dict(type="zeroshot_retrieval")

  if arg.smoke:
    configs.apply_smoke(c)
  return c
