"""Tasks: what differs per experiment (model, data, loss, evaluation)."""


def get_task(config, mesh):
  """The task named by `config.task`, built for `mesh`."""
  if config.task == "classify":
    from mmjax.tasks import classify
    return classify.ClassifyTask(config, mesh)
  if config.task == "clip":
    from mmjax.tasks import clip
    return clip.ClipTask(config, mesh)
  if config.task == "autoencoder":
    from mmjax.tasks import ldm
    return ldm.AutoencoderTask(config, mesh)
  if config.task == "ldm":
    from mmjax.tasks import ldm
    return ldm.LatentDiffusionTask(config, mesh)
  if config.task == "vqa":
    from mmjax.tasks import vqa
    return vqa.VqaTask(config, mesh)
  if config.task == "imagebert":
    from mmjax.tasks import imagebert
    return imagebert.ImageBertTask(config, mesh)
  raise ValueError(f"config.task={config.task!r}: known tasks are 'classify', 'clip', "
                   f"'autoencoder' and 'ldm'.")
