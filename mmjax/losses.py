"""Small pure loss functions. Shapes are in each docstring."""
import functools

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy with integer labels.

  Args:
    logits: [batch, classes].
    labels: [batch] integer class ids.

  Returns:
    [batch] losses.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[batch, classes], [batch] -> [batch] float, 1.0 where argmax equals the label."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def l2_normalise(x: jax.Array) -> jax.Array:
  """[..., dim] -> unit vectors along the last axis."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def info_nce(image_emb: jax.Array, text_emb: jax.Array, temperature) -> jax.Array:
  """CLIP's symmetric contrastive loss; matching pairs on the diagonal.

  Args:
    image_emb, text_emb: [batch, dim], normalised here.
    temperature: scalar; logits = image · textᵀ / temperature.

  Returns:
    Scalar: mean of the image->text and text->image cross-entropies.
  """
  img, txt = l2_normalise(image_emb), l2_normalise(text_emb)
  logits = img @ txt.T / temperature  # [batch, batch]
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (softmax_cross_entropy(logits, labels).mean()
                + softmax_cross_entropy(logits.T, labels).mean())


def sigmoid_contrastive(image_emb: jax.Array, text_emb: jax.Array, log_scale, bias) -> jax.Array:
  """SigLIP's loss: every pair is a binary match / no-match decision.

  Args:
    image_emb, text_emb: [batch, dim], normalised here.
    log_scale, bias: scalars; logits = image · textᵀ · exp(log_scale) + bias.

  Returns:
    Scalar: -Σ log σ(label · logit) / batch, label +1 on the diagonal, -1 elsewhere.
  """
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


def info_nce_sharded(image_emb, text_emb, temperature, mesh, axis_name: str = "data"):
  """`info_nce` over the global batch of [batch, dim] arrays split along `axis_name`."""
  if mesh.shape[axis_name] == 1:
    return info_nce(image_emb, text_emb, temperature)
  return _sharded(info_nce_block, mesh, axis_name, 1)(image_emb, text_emb, temperature)


def sigmoid_contrastive_sharded(image_emb, text_emb, log_scale, bias, mesh,
                                axis_name: str = "data"):
  """`sigmoid_contrastive` over the global batch split along `axis_name`."""
  if mesh.shape[axis_name] == 1:
    return sigmoid_contrastive(image_emb, text_emb, log_scale, bias)
  return _sharded(sigmoid_contrastive_block, mesh, axis_name, 2)(image_emb, text_emb,
                                                                 log_scale, bias)
