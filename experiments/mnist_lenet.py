r"""LeNet-5 (or the CNN tutorial's SmallCNN) on MNIST.

Command:
  python launch.py --config=experiments/mnist_lenet.py --workdir=workdirs/mnist_lenet

Expected result (2-core CPU): eval/accuracy >= 0.990 on the whole MNIST test split.
See the README's results table for the measured accuracy and wall-clock.

Arguments (comma separated, after the colon):
  smoke            seconds-long run: tiny step count, batch divisible by 8, two checkpoints.
  model=small_cnn  train SmallCNN instead of LeNet-5.
  dataset=fashion_mnist  another TFDS dataset of 28x28x1 images with 10 classes.

  python launch.py --config=experiments/mnist_lenet.py:smoke --workdir=/tmp/smoke
  python launch.py --config=experiments/mnist_lenet.py:model=small_cnn --workdir=workdirs/small_cnn
"""
from mmjax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False, model="lenet5", dataset="mnist")
  c = configs.base_config()
  c.task = "classify"
  c.model = arg.model
  c.dataset.name = arg.dataset

  # Steps of a few ms: glibc's default malloc arenas are faster here (benchmarks/README.md).
  c.reuse_host_memory = False
  # 4690 steps: 10 epochs of 60,000 images.
  configs.set_steps(c, batch=128, steps=4690, log_every=200, eval_every=938,
                    checkpoint_every=938)
  configs.set_optimizer(c, "adam", learning_rate=3e-3, warmup_steps=200)
  c.evals.accuracy = dict(type="classification")  # Every eval_every_steps, whole test split.

  if arg.smoke:
    configs.apply_smoke(c)
    c.eval_every_steps = 10
  return c
