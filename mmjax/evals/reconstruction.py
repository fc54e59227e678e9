"""Reconstruction by an autoencoder: error, KL and latent scale over a whole split."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import sources
from mmjax.evals import common
from mmjax.evals import generative
from mmjax.models import autoencoder as ae_lib
from mmjax.tasks import base


class Reconstruction:
  """eval/recon_mse (pixels in [0, 1]), eval/kl, eval/latent_rms, and an image of
  `num_images` test images over their reconstructions ("reconstructions").

  Needs a `tasks.base.Reconstructor`: `task.reconstruct` on batches of
  `task.eval_preprocess`.
  """

  def __init__(self, task: base.Reconstructor, split: str | None = None,
               batch_size: int | None = None, num_images: int = 8):
    c = task.config
    self.task = task
    self.batch_size = common.check_eval_batch(batch_size or c.eval_batch_size, task.mesh)
    self.source = sources.load_source(c.dataset, split or c.dataset.eval_split)
    self.num_images = num_images
    self._sums = jax.jit(self._batch_sums)
    self._reconstruct = jax.jit(lambda p, e, x: task.reconstruct(p, e, x)[0])

  def _batch_sums(self, params, extras, batch):
    x, mask = batch["image"], batch["mask"]
    recon, mean, logvar = self.task.reconstruct(params, extras, x)
    mse = jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - x), axis=(1, 2, 3)) / 4
    return {"recon_mse": jnp.sum(mse * mask),
            "kl": jnp.sum(ae_lib.kl_divergence(mean, logvar) * mask),
            "latent_sq": jnp.sum(jnp.mean(jnp.square(mean), axis=(1, 2, 3)) * mask),
            "count": jnp.sum(mask)}

  def run(self, params, extras) -> dict:
    dataset = common.eval_batches(self.source, self.batch_size, self.task.eval_preprocess)
    metrics = common.means(common.sum_over_batches(
        functools.partial(self._sums, params, extras), dataset, self.task.mesh))
    metrics["eval/latent_rms"] = float(np.sqrt(metrics.pop("eval/latent_sq")))
    x = self.task.eval_preprocess(
        sources.gather(self.source, np.arange(self.num_images)))["image"]
    recon = self._reconstruct(jax.device_get(params), jax.device_get(extras), x)
    pair = np.concatenate([x, np.asarray(recon)]) * 0.5 + 0.5
    metrics["reconstructions"] = generative.image_grid(pair, rows=2)
    return metrics
