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
  """The task named by `config.task`, built for `mesh` (cheap: `setup()` is not called);
  with `config.lora` or `config.warm_start`, wrapped as `adapted.AdaptedTask`."""
  task = registry.lookup(TASKS, config.task, "task", "tasks")(config, mesh)
  return _adapted(task, config)


def _adapted(task, config):
  """`task`, wrapped for LoRA and warm starts when the config asks for them."""
  from mmjax.tasks import adapted  # pylint: disable=import-outside-toplevel
  return adapted.AdaptedTask(task, config) if adapted.wanted(config) else task
