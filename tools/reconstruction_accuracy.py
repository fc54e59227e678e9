"""How well an autoencoder run keeps what a classifier sees: a LeNet-5 run's accuracy on
test images and on the autoencoder's reconstructions of them.

  python tools/reconstruction_accuracy.py --autoencoder=workdirs/ldm_autoencoder \
      --classifier=workdirs/lenet_fashion --dataset=fashion_mnist

For a first stage trained on one dataset and used on another (experiments/ldm_lora.py
keeps the MNIST autoencoder for Fashion-MNIST): the accuracy on reconstructions bounds
what samples decoded by it can reach. Prints one JSON line. Needs a prepared TFDS
directory ($TFDS_DATA_DIR).
"""
import argparse
import json


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--autoencoder", required=True, help="an autoencoder run's workdir")
  parser.add_argument("--classifier", required=True, help="a LeNet-5 run's workdir")
  parser.add_argument("--dataset", default="fashion_mnist")
  parser.add_argument("--split", default="test[:2000]")
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from mmjax import models, runs  # pylint: disable=import-outside-toplevel
  from mmjax.data import image  # pylint: disable=import-outside-toplevel
  from mmjax.models import autoencoder as ae_lib  # pylint: disable=import-outside-toplevel
  from mmjax.tasks import ldm  # pylint: disable=import-outside-toplevel

  source = tfds.data_source(args.dataset, split=args.split)
  records = [source[i] for i in range(len(source))]
  images = np.stack([r["image"] for r in records])
  labels = np.array([r["label"] for r in records])
  ae_run = runs.load_run(args.autoencoder, task="autoencoder", field="autoencoder")
  ae = ae_lib.AutoencoderKL(**ldm.module_kwargs(ae_run.field("model")))
  reconstruct = jax.jit(lambda p, x: ae.apply({"params": p}, x)[0])
  recon = np.clip(np.asarray(reconstruct(ae_run.params, ldm.to_unit_range(images))) * 0.5 + 0.5,
                  0.0, 1.0)
  judge_run = runs.load_run(args.classifier, task="classify", field="classifier")
  mean, std = image.normalisation(args.dataset)
  judge = jax.jit(lambda p, x: models.LeNet5().apply({"params": p}, (x - mean) / std))
  accuracy = lambda x: float(np.mean(np.argmax(judge(judge_run.params, x), -1) == labels))
  print(json.dumps({"dataset": args.dataset, "split": args.split, "examples": len(labels),
                    "accuracy_on_images": accuracy(images / 255.0),
                    "accuracy_on_reconstructions": accuracy(recon),
                    "reconstruction_mse": float(np.mean((recon - images / 255.0) ** 2))}))


if __name__ == "__main__":
  main()
