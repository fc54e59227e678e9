r"""Per-layer timings of every lowering of `mmjax.nn.conv2d`, as JSON lines.

  python benchmarks/conv_lowering.py --batch 512
  python benchmarks/conv_lowering.py --batch 128 --layers lenet.c1,lenet.c3

For each convolution of LeNet-5 and SmallCNN, and the 3x3 ones of the latent-diffusion
U-Net (shapes after padding), times three
jitted functions for each lowering in `mmjax.nn.conv_cpu` ("shift", "band", "band<n>",
"xla", "patches"):

  forward       activation(conv(x, k) + b), the activation of the model (tanh or ReLU),
                since what XLA fuses into the convolution's loop changes its speed;
  input_grad    the VJP with respect to x alone;
  kernel_grad   the VJP with respect to the kernel alone.

The lowerings are timed alternately (A B C A B C ...), `--rounds` times, and each line
gives the median milliseconds per call ("ms") and the fastest round ("min_ms", the
steadier figure on a shared machine). `choose_plan` in mmjax/nn/conv_cpu.py follows
these numbers; `train_throughput.py` checks the choice over a whole step.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name: (padded height, padded width, cin, cout, kernel size, activation)
LAYERS = {
    "lenet.c1": (32, 32, 1, 6, 5, "tanh"),
    "lenet.c3": (14, 14, 6, 16, 5, "tanh"),
    "small_cnn.conv1": (32, 32, 1, 10, 5, "relu"),
    "small_cnn.conv2": (18, 18, 10, 16, 5, "relu"),
    "small_cnn.conv3": (9, 9, 16, 64, 3, "relu"),
    # experiments/ldm_mnist.py's U-Net on 8x8 latents: 3x3 convolutions at both levels.
    "unet.l0": (10, 10, 32, 32, 3, "relu"),
    "unet.l1": (6, 6, 64, 64, 3, "relu"),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--layers", default=",".join(LAYERS))
  parser.add_argument("--lowerings", default="shift,band,band14,band7,band5,band4,xla,patches")
  parser.add_argument("--parts", default="forward,input_grad,kernel_grad")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=10, help="calls per timing")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from mmjax.nn import conv_cpu

  rng = np.random.default_rng(0)
  stride = (1, 1)
  for layer in args.layers.split(","):
    h, w, cin, cout, size, act = LAYERS[layer]
    activation = {"tanh": jnp.tanh, "relu": jax.nn.relu}[act]
    x = jnp.asarray(rng.normal(size=(args.batch, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(size, size, cin, cout)) / size / np.sqrt(cin), jnp.float32)
    b = jnp.zeros((cout,), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(args.batch, h - size + 1, w - size + 1, cout)), jnp.float32)
    lowerings = [n for n in args.lowerings.split(",")
                 if n != "shift" or cin * size * size <= 150]  # Else too many terms.

    for part in args.parts.split(","):
      fns = {}
      for name in lowerings:
        f = conv_cpu.lowering(name)
        if part == "forward":
          fns[name] = (jax.jit(lambda x, k, f=f: activation(f(x, k, stride) + b)), (x, k))
        elif part == "input_grad":
          fns[name] = (jax.jit(lambda k, dy, f=f: jax.vjp(lambda x: f(x, k, stride), x)[1](dy)[0]),
                       (k, dy))
        else:
          fns[name] = (jax.jit(lambda x, dy, f=f: jax.vjp(lambda k: f(x, k, stride), k)[1](dy)[0]),
                       (x, dy))
      times = {name: [] for name in fns}
      for name, (f, a) in fns.items():
        jax.block_until_ready(f(*a))
      for _ in range(args.rounds):
        for name, (f, a) in fns.items():
          t = time.perf_counter()
          for _ in range(args.calls):
            out = f(*a)
          jax.block_until_ready(out)
          times[name].append(1e3 * (time.perf_counter() - t) / args.calls)
      ms = {name: round(statistics.median(v), 3) for name, v in times.items()}
      fastest = {name: round(min(v), 3) for name, v in times.items()}
      print(json.dumps({"layer": layer, "batch": args.batch, "part": part,
                        "best": min(ms, key=ms.get), "ms": ms, "min_ms": fastest}), flush=True)


if __name__ == "__main__":
  main()
