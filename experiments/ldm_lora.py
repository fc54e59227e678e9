r"""LoRA on latent diffusion: the MNIST diffusion run adapted to Fashion-MNIST captions.

Every parameter of the diffusion stage (U-Net and its text Transformer) starts from
the EMA weights of an experiments/ldm_mnist.py diffusion run (`ldm_workdir`;
`warm_start.source="ema"`, as released Stable Diffusion weights are EMA weights) and
stays frozen; low-rank adapters (mmjax/lora.py) beside the U-Net's kernels and the text
Transformer's attention and MLP kernels train on "a photo of a sneaker" and the like.
The first stage is the MNIST run's autoencoder, unchanged (`autoencoder_workdir=` names
another). Samples are judged by a LeNet-5 trained on Fashion-MNIST
(experiments/mnist_lenet.py:dataset=fashion_mnist) with the same `sample_quality`
evaluator as the MNIST run. The EMA keeps the frozen base exactly and averages the
adapters, so `lora.strip` of this run's EMA is the MNIST run's EMA, bit for bit:
removing the adapters gives the MNIST model back.

`targets=attention` adapts only the U-Net's self- and cross-attention projections
(diffusers' default for SD LoRA), `targets=transformer` also the transformers' input
and output projections and feed-forward layers, `targets=all` (the default) every
U-Net kernel (convolutions as PEFT's Conv LoRA) but those of the first and last
convolutions, whose 4 latent channels are below the rank. The line "Training N of M
parameters" gives the trained share.

Commands (after the three runs of experiments/ldm_mnist.py's docstring):
  python launch.py --config=experiments/mnist_lenet.py:dataset=fashion_mnist \
      --workdir=workdirs/lenet_fashion
  python launch.py --config=experiments/ldm_lora.py --workdir=workdirs/ldm_lora \
      --cpu_devices=2
  python launch.py --config=experiments/ldm_lora.py:smoke,ldm_workdir=/tmp/ldm \
      --workdir=/tmp/ldm_lora --config.autoencoder_workdir=/tmp/ae \
      --config.evals.samples.classifier_workdir=/tmp/lenet

Expected result (2-core CPU, about 20 minutes; a MNIST diffusion run at 0.99): 14.7% of
the parameters trained; eval/sample_accuracy (the Fashion LeNet-5, 90% on real test
images, on 100 samples per class) about 0.75 at step 750 and 0.81 at step 1,500, at
eval/best_guidance 4. docs/lora.md has the measured figures.
Sample grids: <workdir>/images/samples_guidance_*_<step>.png, one row per class.
"""
from experiments import ldm_mnist
from mmjax import configs

UNET_ATTENTION = (r"unet/.*/(self|cross)_attention/(query|key|value|out)/kernel",)
UNET_TRANSFORMER = UNET_ATTENTION + (r"unet/.*_attn\d*/(proj_in|proj_out)/kernel",
                                     r"unet/.*/ff/fc[12]/kernel")
UNET_ALL = (r"unet/(?!conv_(in|out)/).*/kernel",)  # conv_in/out: 4 latent channels.
TEXT = (r"text/.*/attention/(query|key|value|out)/kernel", r"text/.*/mlp/fc[12]/kernel")
TARGETS = {"attention": UNET_ATTENTION, "transformer": UNET_TRANSFORMER, "all": UNET_ALL}


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, ldm_workdir="workdirs/ldm_diffusion",
                          targets="all", rank=8, text=True)
  if arg.targets not in TARGETS:
    raise ValueError(f"ldm_lora: targets={arg.targets!r}: use one of {sorted(TARGETS)}.")
  c = ldm_mnist.get_config(f"stage=diffusion,smoke={arg.smoke}")
  c.dataset.name = "fashion_mnist"
  c.prompt = "a photo of a {}"
  c.warm_start.workdir = arg.ldm_workdir
  c.warm_start.source = "ema"
  c.lora = dict(rank=arg.rank, alpha=float(arg.rank), targets=TARGETS[arg.targets] +
                (TEXT if arg.text else ()), dropout=0.0, train=())
  c.evals.samples.classifier_workdir = "workdirs/lenet_fashion"
  if not arg.smoke:
    configs.set_steps(c, batch=128, steps=1500, log_every=100, eval_every=750,
                      checkpoint_every=500)
    configs.set_optimizer(c, "adamw", learning_rate=2e-3, warmup_steps=100,
                          weight_decay=0.0, grad_clip_norm=1.0, flatten=True)
  return c
