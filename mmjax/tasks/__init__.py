"""Tasks: what differs per experiment (model, data, loss, evaluation)."""


def get_task(config, mesh):
  """The task named by `config.task`, built for `mesh`."""
  if config.task == "classify":
    from mmjax.tasks import classify
    return classify.ClassifyTask(config, mesh)
  if config.task == "clip":
    from mmjax.tasks import clip
    return clip.ClipTask(config, mesh)
  raise ValueError(f"config.task={config.task!r}: known tasks are 'classify' and 'clip'.")
