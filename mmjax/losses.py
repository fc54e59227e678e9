"""Small pure loss functions. Shapes are in each docstring.

Shapes and static arguments are checked while tracing (a ValueError naming the
function); values inside a jitted loss are traced and never checked (no host syncs).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy with integer labels.

  Args:
    logits: [..., classes], e.g. [batch, classes] or [batch, length, vocab].
    labels: [...] integer class ids in [0, classes), the shape of `logits` without
      its last axis.

  Returns:
    [...] losses.

  Raises:
    ValueError, starting "softmax_cross_entropy:", for mismatched shapes or non-integer
    labels. The labels' values are traced and not checked: -classes <= label < 0
    silently counts from the end (-1 is the last class) and any other out-of-range
    label gives NaN. Check NumPy batches with `mmjax.data.sources.check_labels`.
  """
  shape, label_shape = jnp.shape(logits), jnp.shape(labels)
  if len(shape) < 1 or label_shape != shape[:-1]:
    raise ValueError(f"softmax_cross_entropy: labels must have the shape of logits without "
                     f"its class axis, {shape[:-1]}, got logits {shape} and labels "
                     f"{label_shape}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"softmax_cross_entropy: labels must be integer class ids, got dtype "
                     f"{jnp.result_type(labels)}; cast them with .astype(int32).")
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[batch, classes], [batch] -> [batch] float, 1.0 where argmax equals the label."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """[..., dim] -> unit vectors along the last axis; vectors of norm <= `eps` -> zeros.

  Zero-safe: finite gradients everywhere. A vector of norm <= `eps` (a padded or dead
  example) gets a zero gradient; x / max(|x|, eps) gives it NaN (the norm's gradient
  at 0), and x * rsqrt(max(|x|², eps²)) 1 / eps = 1e12 times the incoming gradient.
  Other vectors: x / |x| to float rounding.
  """
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  nonzero = squared > eps * eps
  return jnp.where(nonzero, x * jax.lax.rsqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


def _check_embeddings(fn: str, image_emb, text_emb, batch_multiple: int = 1) -> None:
  """Both [batch, dim], of one shape, batch >= 1 and a multiple of `batch_multiple`."""
  a, b = jnp.shape(image_emb), jnp.shape(text_emb)
  if len(a) != 2 or a != b or a[0] < 1:
    raise ValueError(f"{fn}: image_emb and text_emb must both be [batch, dim] of one shape, "
                     f"with matching pairs in the same rows; got {a} and {b}.")
  if a[0] % batch_multiple:
    raise ValueError(f"{fn}: the batch of {a[0]} does not split over {batch_multiple} "
                     f"devices; use a multiple of {batch_multiple}.")


def _check_scalars(fn: str, **scalars) -> None:
  for name, value in scalars.items():
    if jnp.ndim(value) != 0:
      raise ValueError(f"{fn}: {name} must be a scalar, got shape {jnp.shape(value)}.")


def _check_temperature(fn: str, temperature) -> None:
  """A scalar; when it is static (a Python or NumPy number), a finite one > 0."""
  _check_scalars(fn, temperature=temperature)
  if isinstance(temperature, (int, float, np.number, np.ndarray)):
    if not (np.isfinite(temperature) and temperature > 0):
      raise ValueError(f"{fn}: temperature must be > 0 (logits = similarity / "
                       f"temperature), got {temperature!r}.")


def info_nce(image_emb: jax.Array, text_emb: jax.Array, temperature) -> jax.Array:
  """CLIP's symmetric contrastive loss; matching pairs on the diagonal.

  Args:
    image_emb, text_emb: [batch, dim], normalised here (a zero row gets zero gradient).
    temperature: scalar > 0; logits = image · textᵀ / temperature. Checked when it is
      a Python or NumPy number; a traced one (CLIP's learned 1 / exp(logit_scale))
      is not, and 0 there gives NaN.

  Returns:
    Scalar: mean of the image->text and text->image cross-entropies.

  Raises:
    ValueError, starting "info_nce:", for mismatched shapes or a static temperature <= 0.
  """
  _check_embeddings("info_nce", image_emb, text_emb)
  _check_temperature("info_nce", temperature)
  img, txt = l2_normalise(image_emb), l2_normalise(text_emb)
  logits = img @ txt.T / temperature  # [batch, batch]
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (softmax_cross_entropy(logits, labels).mean()
                + softmax_cross_entropy(logits.T, labels).mean())


def sigmoid_contrastive(image_emb: jax.Array, text_emb: jax.Array, log_scale, bias) -> jax.Array:
  """SigLIP's loss: every pair is a binary match / no-match decision.

  Args:
    image_emb, text_emb: [batch, dim], normalised here (a zero row gets zero gradient).
    log_scale, bias: scalars; logits = image · textᵀ · exp(log_scale) + bias.

  Returns:
    Scalar: -Σ log σ(label · logit) / batch, label +1 on the diagonal, -1 elsewhere.

  Raises:
    ValueError, starting "sigmoid_contrastive:", for mismatched or non-scalar shapes.
  """
  _check_embeddings("sigmoid_contrastive", image_emb, text_emb)
  _check_scalars("sigmoid_contrastive", log_scale=log_scale, bias=bias)
  img, txt = l2_normalise(image_emb), l2_normalise(text_emb)
  logits = img @ txt.T * jnp.exp(log_scale) + bias
  labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


# Under data parallelism every example's negatives are the whole global batch. Each
# device gathers the other modality's embeddings from all devices and computes its
# [local_batch, global_batch] block of logits; the sums are psum-ed over devices.


def _local_rows(n_local: int, axis_name: str):
  """Global indices of this device's rows: its positives' columns."""
  return jax.lax.axis_index(axis_name) * n_local + jnp.arange(n_local)


def info_nce_block(img, txt, temperature, axis_name: str):
  """`info_nce` inside shard_map: img, txt are this device's [local, dim] rows."""
  img, txt = l2_normalise(img), l2_normalise(txt)
  all_img = jax.lax.all_gather(img, axis_name, tiled=True)  # [global, dim]
  all_txt = jax.lax.all_gather(txt, axis_name, tiled=True)
  labels = _local_rows(img.shape[0], axis_name)
  i2t = softmax_cross_entropy(img @ all_txt.T / temperature, labels)  # [local]
  t2i = softmax_cross_entropy(txt @ all_img.T / temperature, labels)
  return jax.lax.psum(jnp.sum(i2t) + jnp.sum(t2i), axis_name) / (2 * all_img.shape[0])


def sigmoid_contrastive_block(img, txt, log_scale, bias, axis_name: str):
  """`sigmoid_contrastive` inside shard_map, on this device's [local, dim] rows."""
  img, txt = l2_normalise(img), l2_normalise(txt)
  all_txt = jax.lax.all_gather(txt, axis_name, tiled=True)  # [global, dim]
  logits = img @ all_txt.T * jnp.exp(log_scale) + bias  # [local, global]
  rows = _local_rows(img.shape[0], axis_name)
  labels = jnp.where(rows[:, None] == jnp.arange(all_txt.shape[0])[None, :], 1.0, -1.0)
  total = jax.lax.psum(jnp.sum(jax.nn.log_sigmoid(labels * logits)), axis_name)
  return -total / all_txt.shape[0]


def _sharded(block, mesh, axis_name, num_scalars):
  from jax.sharding import PartitionSpec as P
  specs = (P(axis_name), P(axis_name)) + (P(),) * num_scalars
  return jax.shard_map(functools.partial(block, axis_name=axis_name), mesh=mesh,
                       in_specs=specs, out_specs=P())


def _mesh_size(fn: str, mesh, axis_name) -> int:
  """The number of batch shards along `axis_name`: one mesh axis or a tuple of them."""
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  for name in names:
    if name not in mesh.shape:
      raise ValueError(f"{fn}: the mesh has no axis {name!r}; its axes are "
                       f"{tuple(mesh.shape)}.")
  return int(np.prod([mesh.shape[name] for name in names]))


def info_nce_sharded(image_emb, text_emb, temperature, mesh, axis_name="data"):
  """`info_nce` over the global batch of [batch, dim] arrays split along `axis_name`
  (a mesh axis, or a tuple of them: ("data", "fsdp") for the trainer's mesh).

  Checks as `info_nce` (errors start "info_nce_sharded:"), and that the batch splits
  evenly over the mesh axis.
  """
  fn = "info_nce_sharded"
  _check_embeddings(fn, image_emb, text_emb, _mesh_size(fn, mesh, axis_name))
  _check_temperature(fn, temperature)
  if _mesh_size(fn, mesh, axis_name) == 1:
    return info_nce(image_emb, text_emb, temperature)
  return _sharded(info_nce_block, mesh, axis_name, 1)(image_emb, text_emb, temperature)


def sigmoid_contrastive_sharded(image_emb, text_emb, log_scale, bias, mesh,
                                axis_name="data"):
  """`sigmoid_contrastive` over the global batch split along `axis_name` (one mesh axis
  or a tuple of them).

  Checks as `sigmoid_contrastive` (errors start "sigmoid_contrastive_sharded:"), and
  that the batch splits evenly over the mesh axis.
  """
  fn = "sigmoid_contrastive_sharded"
  _check_embeddings(fn, image_emb, text_emb, _mesh_size(fn, mesh, axis_name))
  _check_scalars(fn, log_scale=log_scale, bias=bias)
  if _mesh_size(fn, mesh, axis_name) == 1:
    return sigmoid_contrastive(image_emb, text_emb, log_scale, bias)
  return _sharded(sigmoid_contrastive_block, mesh, axis_name, 2)(image_emb, text_emb,
                                                                 log_scale, bias)
