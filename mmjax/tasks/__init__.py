"""Tasks: what differs per experiment (model, data, loss); `base.Task` is the interface."""
from mmjax import registry

# config.task -> "module:class", imported only when used.
TASKS = {
    "classify": "mmjax.tasks.classify:ClassifyTask",
    "clip": "mmjax.tasks.clip:ClipTask",
    "autoencoder": "mmjax.tasks.ldm:AutoencoderTask",
    "ldm": "mmjax.tasks.ldm:LatentDiffusionTask",
    "vqa": "mmjax.tasks.vqa:VqaTask",
    "imagebert": "mmjax.tasks.imagebert:ImageBertTask",
    "sd": "mmjax.tasks.sd:StableDiffusionTask",
}


def get_task(config, mesh):
  """The task named by `config.task`, built for `mesh` (cheap: `setup()` is not called)."""
  return registry.lookup(TASKS, config.task, "task", "tasks")(config, mesh)
