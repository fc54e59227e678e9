"""An Idefics2-style vision-language model: image -> a few tokens in front of a causal LM.

    image [b, H, W, C]
      -> ViT (mmjax.models.vit's parameters; random, a CLIP run's image tower, or an
         open_clip file's with OpenAI's layout through `vision_options`)
         every token [b, n_vision, vision_width]
      -> perceiver resampler: num_latents learned queries cross-attend to them
         [b, num_latents, vision_width]
      -> modality projection MLP [b, num_latents, width]
      -> concatenated in front of the text's token embeddings, read by a causal
         Transformer decoder that predicts the next text token.

With `image_split=2` the image is cut into 2x2 sub-images, each encoded by the ViT and
pooled by the resampler on its own (Idefics2's image splitting): num_latents tokens per
sub-image, in reading order, each sub-image's tagged with a learned embedding.

Text is laid out as [PAD ... PAD BOS question][answer EOS PAD ...]: prompts are padded
on the left so that every answer starts at the same index, which lets a whole batch be
decoded in step. Position ids count valid tokens only (cumsum of the validity mask), so
left padding does not shift them.

`greedy_generate` decodes with a key/value cache inside one `lax.while_loop`
(`use_cache=False`: the whole sequence re-run at every step; the same tokens, slower).

`dtype` (computation, also the key/value cache's by default) and `param_dtype`
(parameters) go to every layer (see mmjax.nn.precision); the logits are float32.
`remat` recomputes the ViT's and the decoder's blocks in the backward pass. There is
no scanned form: the decoder's blocks each keep their own cache.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data import tokenizer
from mmjax.models import vit
from mmjax.nn import fusion
from mmjax.nn import precision
from mmjax.nn import transformer

Cache = list[dict[str, jax.Array]]  # Per layer {"k", "v"}: [batch, max_len, heads, head_dim].


def split_image(images: jax.Array, grid: int) -> jax.Array:
  """[b, H, W, c] -> [b * grid², H / grid, W / grid, c], sub-images in reading order."""
  b, h, w, c = images.shape
  if h % grid or w % grid:
    raise ValueError(f"Images {list(images.shape)} do not split into {grid}x{grid} tiles.")
  x = images.reshape(b, grid, h // grid, grid, w // grid, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * grid * grid, h // grid, w // grid, c)


def chunk_mask(key_valid: jax.Array, index, length: int) -> jax.Array:
  """Causal mask of `length` queries at absolute positions index.. over all keys.

  Args:
    key_valid: [batch, kv_len] bool, the keys that hold real tokens.
    index: int or scalar array, the absolute position of the first query.
    length: the number of queries.

  Returns:
    [batch, 1, length, kv_len] bool: key j is seen by query i iff j <= index + i and
    key j is valid.
  """
  q = index + jnp.arange(length)
  causal = jnp.arange(key_valid.shape[1])[None, :] <= q[:, None]
  return causal[None, None] & key_valid[:, None, None, :]


def positions_from_valid(valid: jax.Array) -> jax.Array:
  """[batch, len] bool -> [batch, len] int32 position ids: the number of valid tokens before."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


class VisionLanguageModel(nn.Module):
  """images [b, H, W, C], tokens [b, T], valid [b, T] -> next-token logits [b, T, vocab].

  The image becomes `num_image_tokens` tokens in front of the text (`num_latents`, or
  `num_latents` per sub-image with `image_split`; see the module docstring). `max_len`
  bounds num_image_tokens + T. The logits are float32 whatever `dtype` is.
  """
  vision_variant: str = "mu/7"
  vision_pool: str = "tok"
  # ViT layout options, ((name, value), ...) from vit.LAYOUT_OPTIONS, e.g. OpenAI's
  # (vit.openai_options) and "dims" for a loaded open_clip tower. Default: mmjax's layout.
  vision_options: tuple = ()
  image_split: int = 1
  num_latents: int = 16
  resampler_depth: int = 1
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 128
  vocab_size: int = tokenizer.VOCAB_SIZE
  remat: str = "none"  # "none", "full" or a jax.checkpoint_policies name.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Every token of the ViT; with vision_pool="tok" the class token too. The
    # parameters are vit.ViT(vision_variant, vision_pool)'s, so a CLIP tower loads.
    options = {"class_token": self.vision_pool == "tok",
               **vit.layout_options(self.vision_options)}
    self.vision = vit.ViT(self.vision_variant, pool="none", remat=self.remat, **options,
                          **types)
    vision_width = vit.parse_variant(self.vision_variant, options.get("dims"))["width"]
    if self.image_split > 1:
      self.subimage_embedding = self.param("subimage_embedding", nn.initializers.normal(0.02),
                                           (self.image_split ** 2, 1, vision_width),
                                           self.param_dtype)
    self.resampler = fusion.PerceiverResampler(self.num_latents, self.resampler_depth,
                                               num_heads=self.num_heads, **types)
    self.projection = fusion.ModalityProjection(self.width, **types)
    self.token_embedding = nn.Embed(self.vocab_size, self.width,
                                    embedding_init=nn.initializers.normal(0.02), **types)
    self.pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.02),
                                    (self.max_len, self.width), self.param_dtype)
    # Argument 5 (self is 0) of a block is `deterministic`: static under remat.
    block = precision.remat(transformer.EncoderBlock, self.remat, static_argnums=(5,))
    self.blocks = [block(self.num_heads, self.mlp_dim, **types) for _ in range(self.depth)]
    self.ln_final = nn.LayerNorm(**types)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """[b, H, W, C] -> [b, num_image_tokens, width]: the image's tokens for the LM."""
    b = images.shape[0]
    if self.image_split > 1:
      # Each sub-image is encoded and pooled on its own, as in Idefics2: its tokens stay
      # together, in reading order, tagged with a learned sub-image embedding.
      x = self.resampler(self.vision(split_image(images, self.image_split)))  # [b·s², L, vw]
      x = (x.reshape(b, self.image_split ** 2, *x.shape[1:])
           + self.subimage_embedding.astype(self.dtype))
      x = x.reshape(b, -1, x.shape[-1])
    else:
      x = self.resampler(self.vision(images))
    return self.projection(x)

  @property
  def num_image_tokens(self) -> int:
    """How many tokens `encode_image` puts in front of the text."""
    return self.image_split ** 2 * self.num_latents

  def _run(self, x, positions, mask, caches=None, index=None):
    """x [b, c, width] at positions [b, c] -> (float32 logits [b, c, vocab], per-layer
    {"k", "v"})."""
    x = x.astype(self.dtype) + self.pos_embedding.astype(self.dtype)[positions]
    new = []
    for i, block in enumerate(self.blocks):
      if caches is None:
        x = block(x, mask, None, None, True)
      else:
        x, kv = block(x, mask, caches[i], index, True)
        new.append(kv)
    return self.token_embedding.attend(self.ln_final(x)).astype(jnp.float32), new

  def _check_len(self, n: int):
    if n > self.max_len:
      raise ValueError(f"{self.num_image_tokens} image tokens + text make {n} positions, more "
                       f"than max_len={self.max_len}.")

  def logits_from_prefix(self, prefix: jax.Array, tokens: jax.Array,
                         valid: jax.Array) -> jax.Array:
    """prefix [b, n, width] (from encode_image), tokens and valid [b, T] -> [b, T, vocab]."""
    n = prefix.shape[1]
    self._check_len(n + tokens.shape[1])
    x = jnp.concatenate([prefix.astype(self.dtype), self.token_embedding(tokens)], axis=1)
    full_valid = jnp.concatenate([jnp.ones(prefix.shape[:2], bool), valid.astype(bool)], axis=1)
    logits, _ = self._run(x, positions_from_valid(full_valid),
                          chunk_mask(full_valid, 0, x.shape[1]))
    return logits[:, n:]

  def __call__(self, images: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    return self.logits_from_prefix(self.encode_image(images), tokens, valid)

  def prefill(self, prefix: jax.Array, prompt: jax.Array, full_valid: jax.Array,
              cache_dtype=None) -> tuple[jax.Array, Cache]:
    """Runs image tokens and prompt once, filling a key/value cache for later steps.

    Args:
      prefix: [b, n, width] image tokens; prompt: [b, q] int.
      full_valid: [b, L] bool over the whole cache (image, prompt, tokens to come).
      cache_dtype: the cache's dtype; None: the model's `dtype`.

    Returns:
      (float32 logits [b, vocab] at the last prompt position, cache: per layer {"k", "v"}
      [b, L, heads, head_dim] holding positions 0..n+q-1).
    """
    self._check_len(full_valid.shape[1])
    cache_dtype = self.dtype if cache_dtype is None else cache_dtype
    x = jnp.concatenate([prefix.astype(self.dtype), self.token_embedding(prompt)], axis=1)
    b, p = x.shape[:2]
    shape = (b, full_valid.shape[1], self.num_heads, self.width // self.num_heads)
    empty = [{"k": jnp.zeros(shape, cache_dtype), "v": jnp.zeros(shape, cache_dtype)}
             for _ in range(self.depth)]
    positions = positions_from_valid(full_valid)[:, :p]
    logits, cache = self._run(x, positions, chunk_mask(full_valid, 0, p), empty, 0)
    return logits[:, -1], cache

  def decode_step(self, token: jax.Array, index, cache: Cache,
                  full_valid: jax.Array) -> tuple[jax.Array, Cache]:
    """One new token [b] at absolute position `index` -> (logits [b, vocab], cache)."""
    positions = jax.lax.dynamic_slice_in_dim(positions_from_valid(full_valid), index, 1, 1)
    x = self.token_embedding(token[:, None])
    logits, cache = self._run(x, positions, chunk_mask(full_valid, index, 1), cache, index)
    return logits[:, 0], cache


def greedy_generate(model: VisionLanguageModel, params, images: jax.Array, prompt: jax.Array,
                    max_new_tokens: int, use_cache: bool = True) -> jax.Array:
  """Greedy answers, decoded in one `lax.while_loop` (stops when every row has ended).

  Args:
    model, params: a VisionLanguageModel and its parameters.
    images: [b, H, W, C].
    prompt: [b, q] int, padded on the left with PAD (BOS, then the question).
    max_new_tokens: how many tokens to generate at most.
    use_cache: decode with a key/value cache (one token per step); False re-runs
      the whole sequence every step. Both return the same tokens.

  Returns:
    [b, max_new_tokens] int32: each row's tokens up to and including its first EOS,
    then PAD.
  """
  variables = {"params": params}
  b, q = prompt.shape
  prefix = model.apply(variables, images, method=model.encode_image)
  n = prefix.shape[1]
  prompt_valid = prompt != tokenizer.PAD
  text_valid = jnp.concatenate([prompt_valid, jnp.ones((b, max_new_tokens), bool)], axis=1)
  full_valid = jnp.concatenate([jnp.ones((b, n), bool), text_valid], axis=1)

  if use_cache:
    logits, cache = model.apply(variables, prefix, prompt, full_valid, method=model.prefill)

    def next_logits(carry, t, token):
      cache = carry
      logits, cache = model.apply(variables, token, n + q + t, cache, full_valid,
                                  method=model.decode_step)
      return logits, cache
  else:
    buffer = jnp.concatenate([prompt, jnp.zeros((b, max_new_tokens), prompt.dtype)], axis=1)
    logits = model.apply(variables, prefix, buffer, text_valid,
                         method=model.logits_from_prefix)[:, q - 1]
    cache = buffer  # The carried state: the tokens so far.

    def next_logits(carry, t, token):
      buffer = jax.lax.dynamic_update_slice_in_dim(carry, token[:, None].astype(carry.dtype),
                                                   q + t, 1)
      all_logits = model.apply(variables, prefix, buffer, text_valid,
                               method=model.logits_from_prefix)
      return jax.lax.dynamic_index_in_dim(all_logits, q + t, 1, keepdims=False), buffer

  def cond(state):
    t, _, done, _, _ = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, out, done, logits, carry = state
    token = jnp.where(done, tokenizer.PAD, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], t, 1)
    done = done | (token == tokenizer.EOS)
    logits, carry = next_logits(carry, t, token)  # The last step's are unused.
    return t + 1, out, done, logits, carry

  out = jnp.full((b, max_new_tokens), tokenizer.PAD, jnp.int32)
  state = (jnp.zeros((), jnp.int32), out, jnp.zeros((b,), bool), logits, cache)
  return jax.lax.while_loop(cond, body, state)[1]


def with_vision_params(params, vision_params):
  """`params` with its ViT replaced by `vision_params` (e.g. CLIP's "image_tower").

  Raises a ValueError naming the first parameter whose path or shape differs.
  """
  ours = params["vision"]
  want = jax.tree_util.tree_flatten_with_path(ours)[0]
  got = dict(jax.tree_util.tree_flatten_with_path(vision_params)[0])
  for path, x in want:
    name = jax.tree_util.keystr(path)
    if path not in got:
      raise ValueError(f"The loaded vision parameters have no {name} (keys: "
                       f"{sorted(vision_params)}); is the ViT variant or pool different, or "
                       f"was it trained with scan_layers=True?")
    if tuple(got[path].shape) != tuple(x.shape):
      raise ValueError(f"Vision parameter {name}: loaded shape {tuple(got[path].shape)}, the "
                       f"model wants {tuple(x.shape)}; set the ViT variant (and image_split) "
                       f"to what the loaded run used.")
  if len(got) != len(want):
    raise ValueError(f"The loaded vision parameters have {len(got)} arrays, the model "
                     f"{len(want)}; is the ViT variant or pool different?")
  loaded = jax.tree.map(lambda x, y: jnp.asarray(y, x.dtype), ours,
                        jax.tree_util.tree_unflatten(jax.tree.structure(ours),
                                                     [got[p] for p, _ in want]))
  return {**params, "vision": loaded}
