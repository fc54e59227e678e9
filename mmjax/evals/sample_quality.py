"""Class-conditional samples judged by a classifier: accuracy and Fréchet distance."""
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import models
from mmjax.data import image
from mmjax.data import sources
from mmjax.evals import generative
from mmjax import models
from mmjax import parallel
from mmjax import runs
from mmjax.tasks import base


class SampleQuality:
  """Samples `samples_per_class` images of every class at each guidance scale.

  Each sample is classified by the LeNet-5 of `classifier_workdir` (a run of the
  classify task): eval/sample_accuracy/guidance_{g} against the prompt's class, and
  eval/fld/guidance_{g}, the Fréchet distance to the test split in the classifier's
  84-unit feature space; eval/sample_accuracy and eval/fld at the most accurate scale
  (eval/best_guidance); eval/fld_reference, as many real training images against the
  test split. Without a classifier only the sample grids ("samples/guidance_{g}",
  `grid_per_class` per class) are made.

  Needs a `tasks.base.Sampler`: `task.sample` and `task.class_names`.
  """

  def __init__(self, task: base.Sampler, classifier_workdir: str = "",
               samples_per_class: int = 100, guidance_scales=(0.0, 1.0, 2.0, 4.0),
               grid_per_class: int = 8):
    c = task.config
    self.task = task
    self.guidance_scales = tuple(float(g) for g in guidance_scales)
    self.grid_per_class = grid_per_class
    num_classes = len(task.class_names)
    self.labels = np.repeat(np.arange(num_classes), samples_per_class)
    parallel.check_batch_size(len(self.labels), task.mesh,
                                  f"evals.*.samples_per_class x {num_classes}")
    self.judge = None
    if classifier_workdir:
      run = runs.load_run(classifier_workdir, task="classify",
                                 field="evals.*.classifier_workdir")
      if run.field("model") != "lenet5":
        raise ValueError(f"The classifier_workdir of a sample_quality evaluator must hold a "
                         f"LeNet-5 run (its 84-unit layer is the FLD feature space); "
                         f"{classifier_workdir} holds {run.config['model']!r}.")
      self.judge = models.LeNet5()
      self.judge_params = jax.device_get(run.params)
      self.judge_norm = image.normalisation(run.field("dataset.name"))
      self._classify = jax.jit(self._classify_fn,
                               out_shardings=parallel.replicated(task.mesh))
      self.test_features = self._features(
          sources.load_source(c.dataset, c.dataset.eval_split).arrays["image"])
      train = sources.load_source(c.dataset, c.dataset.train_split).arrays["image"]
      self.fld_reference = generative.frechet_distance(
          self._features(train[:len(self.labels)]), self.test_features)

  def _classify_fn(self, params, images):
    """images [n, h, w, c] in [0, 1] -> (logits [n, classes], features [n, 84])."""
    mean, std = self.judge_norm
    logits, state = self.judge.apply({"params": params}, (images - mean) / std,
                                     capture_intermediates=lambda m, _: m.name == "f6")
    return logits, jnp.tanh(state["intermediates"]["f6"]["__call__"][0])

  def _features(self, images_uint8: np.ndarray) -> np.ndarray:
    return np.concatenate([
        np.asarray(self._classify(self.judge_params,
                                  jnp.asarray(images_uint8[i:i + 2000], jnp.float32) / 255.0)[1])
        for i in range(0, len(images_uint8), 2000)])

  def run(self, params, extras) -> dict:
    metrics, grid, n_classes = {}, self.grid_per_class, len(self.task.class_names)
    for g in self.guidance_scales:
      images = self.task.sample(params, extras, self.labels, g)
      shape = images.shape[1:]
      per_class = images.reshape(n_classes, -1, *shape)
      metrics[f"samples/guidance_{g:g}"] = generative.image_grid(
          per_class[:, :grid].reshape(-1, *shape), rows=n_classes)
      if self.judge is not None:
        logits, features = map(np.asarray, self._classify(self.judge_params, images))
        accuracy = float(np.mean(np.argmax(logits, -1) == self.labels))
        metrics[f"eval/sample_accuracy/guidance_{g:g}"] = accuracy
        metrics[f"eval/fld/guidance_{g:g}"] = generative.frechet_distance(
            features, self.test_features)
    if self.judge is not None:
      best = max(self.guidance_scales,
                 key=lambda g: metrics[f"eval/sample_accuracy/guidance_{g:g}"])
      metrics["eval/best_guidance"] = float(best)
      metrics["eval/sample_accuracy"] = metrics[f"eval/sample_accuracy/guidance_{best:g}"]
      metrics["eval/fld"] = metrics[f"eval/fld/guidance_{best:g}"]
      metrics["eval/fld_reference"] = self.fld_reference
    return metrics
