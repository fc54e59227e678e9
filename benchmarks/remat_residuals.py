r"""What the backward pass keeps: bytes of the residuals saved by a ViT's forward pass,
by `config.remat`, as JSON lines. Nothing is run or compiled.

  python benchmarks/remat_residuals.py --variant B/16 --batch 32

The residuals are the leaves of the VJP closure, `jax.vjp(loss, params, images)[1]`,
shaped by `jax.eval_shape`, less the parameters' bytes (the closure holds them too). This is what JAX asks to keep between the forward
and the backward pass; how much of it is live at once is up to XLA's scheduler (see
benchmarks/README.md for what XLA's memory analysis says on the CPU).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--remat", nargs="+",
                      default=["none", "full", "dots_with_no_batch_dims_saveable"])
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from mmjax.models.vit import ViT

  images = jax.ShapeDtypeStruct((args.batch, args.image_size, args.image_size, 3), jnp.float32)
  for remat in args.remat:
    model = ViT(args.variant, remat=remat)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    closure = jax.eval_shape(
        lambda p, x: jax.vjp(lambda p, x: model.apply(p, x).sum(), p, x)[1], params, images)
    leaves = jax.tree.leaves(closure)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    print(json.dumps({"variant": args.variant, "batch": args.batch, "remat": remat,
                      "residual_arrays": len(leaves),
                      "residual_gib": round((total - param_bytes) / 2 ** 30, 3)}))


if __name__ == "__main__":
  main()
