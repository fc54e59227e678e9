"""The Idefics2-style VLM: ViT tokens, causal decoding, cached == uncached generation, CLIP load."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import models
from mmjax.data import tokenizer
from mmjax.data import vqa
from mmjax.models import vit
from mmjax.models import vlm

TINY = dict(vision_variant="mu/7", num_latents=4, width=32, depth=2, num_heads=2, mlp_dim=64,
            max_len=48)


@functools.lru_cache(maxsize=None)
def _tiny(**kwargs):
  """A tiny model and its parameters, made once per configuration (compiling init is slow)."""
  model = vlm.VisionLanguageModel(**{**TINY, **kwargs})
  images = jnp.zeros((1, 56, 56, 1))
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens, tokens > 0)["params"]
  return model, params


@functools.cache
def _apply(model):
  """model.apply, jitted once per model (tests that pass the same shapes share a compile)."""
  return jax.jit(model.apply)


NEW_TOKENS = 10


@functools.partial(jax.jit, static_argnums=0)
def _generate_cached_and_uncached(model, params, images, prompts):
  """greedy_generate with and without the cache: one program for both."""
  return (vlm.greedy_generate(model, params, images, prompts, NEW_TOKENS, True),
          vlm.greedy_generate(model, params, images, prompts, NEW_TOKENS, False))


QUESTIONS = ["what is in the top left?", "is there an eight?", "count the ones.",
             "how many sevens are there?"]


def _images(n, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 56, 56, 1))


def test_vit_tokens_have_the_pooled_vits_parameters_and_its_class_token():
  images = _images(2)[:, :28, :28]
  ref = vit.ViT("mu/4", pool="tok")
  encoder = vit.ViT("mu/4", pool="none", class_token=True)

  @jax.jit  # Initialisation and both passes: one compilation.
  def run(images):
    params = ref.init(jax.random.PRNGKey(0), images)
    return params, encoder.apply(params, images), ref.apply(params, images)

  params, tokens, pooled = run(images)
  shapes = jax.tree.map(jnp.shape, jax.eval_shape(encoder.init, jax.random.PRNGKey(0), images))
  assert shapes == jax.tree.map(jnp.shape, params)
  assert tokens.shape == (2, 1 + 49, 64)
  np.testing.assert_allclose(tokens[:, 0], pooled, atol=1e-5)


def test_split_image_cuts_cells_in_reading_order():
  cells = np.arange(2 * 4 * 3 * 3).reshape(2, 4, 3, 3, 1).astype(np.float32)
  grid = vqa.compose_grid(cells)
  np.testing.assert_array_equal(vlm.split_image(jnp.asarray(grid), 2), cells.reshape(8, 3, 3, 1))


@pytest.mark.slow  # Compiles several models: among the fast tier's costliest.
def test_logits_are_causal_and_left_padding_does_not_shift_positions():
  model, params = _tiny()
  apply = _apply(model)
  prompts = vqa.encode_prompts(["is there a one?", "how many twos are there?"], 30)
  images = _images(2)
  logits = apply({"params": params}, images, prompts, prompts != tokenizer.PAD)
  assert logits.shape == (2, 30, tokenizer.VOCAB_SIZE)
  # Changing the last token changes nothing before it.
  changed = prompts.copy()
  changed[:, -1] = 50
  other = apply({"params": params}, images, changed, changed != tokenizer.PAD)
  np.testing.assert_allclose(other[:, :-1], logits[:, :-1], atol=1e-5)
  # Five more PADs on the left: the same logits at the real tokens.
  wider = vqa.encode_prompts(["is there a one?", "how many twos are there?"], 35)
  padded = apply({"params": params}, images, wider, wider != tokenizer.PAD)
  for row in range(2):
    real = prompts[row] != tokenizer.PAD
    np.testing.assert_allclose(padded[row, 5:][real], logits[row][real], atol=1e-4)


SPLIT = dict(vision_variant="mu/4", image_split=2, num_latents=2)


@pytest.mark.parametrize("vision", [{}, pytest.param(SPLIT, marks=pytest.mark.slow)])
def test_cached_greedy_decoding_equals_uncached(vision):
  model, params = _tiny(**vision)
  prompts = jnp.asarray(vqa.encode_prompts(QUESTIONS, 28))
  images = _images(4)
  cached, uncached = map(np.asarray, _generate_cached_and_uncached(model, params, images, prompts))
  assert cached.shape == (4, NEW_TOKENS)
  np.testing.assert_array_equal(cached, uncached)
  assert len(set(map(tuple, cached))) > 1  # Not a degenerate constant.


def test_split_image_tokens_are_per_sub_image_in_reading_order():
  model, params = _tiny(**SPLIT)
  images = _images(1)
  changed = images.at[:, 28:, :28].set(-images[:, 28:, :28])  # The bottom-left cell only.
  encode = jax.jit(functools.partial(model.apply, {"params": params},
                                     method=model.encode_image))
  a, b = np.asarray(encode(images)), np.asarray(encode(changed))
  assert a.shape == (1, model.num_image_tokens, TINY["width"]) and model.num_image_tokens == 8
  moved = np.abs(a - b).max(axis=(0, 2)) > 1e-6
  np.testing.assert_array_equal(moved, [False] * 4 + [True] * 2 + [False] * 2)


def test_generation_stops_at_eos_and_pads_after_it():
  model, params = _tiny()
  # Make EOS the model's only prediction: a constant final state that points at its embedding.
  width = TINY["width"]
  eos = jnp.zeros(width).at[0].set(1.0)
  table = params["token_embedding"]["embedding"].at[tokenizer.EOS].set(eos)
  params = {**params, "token_embedding": {"embedding": table},
            "ln_final": {"scale": jnp.zeros(width), "bias": 10.0 * eos}}
  # The shapes of test_cached_greedy_decoding_equals_uncached: its compiled program.
  prompts = jnp.asarray(vqa.encode_prompts(QUESTIONS, 28))
  images = _images(4)
  for out in _generate_cached_and_uncached(model, params, images, prompts):
    np.testing.assert_array_equal(out, [[tokenizer.EOS] + [tokenizer.PAD] * (NEW_TOKENS - 1)] * 4)


@pytest.mark.slow  # Compiles several models: among the fast tier's costliest.
def test_prefill_and_decode_step_match_the_full_forward_pass():
  model, params = _tiny()
  variables = {"params": params}
  images = _images(2)
  text = jnp.asarray(vqa.encode_prompts(["is there a nine?", "what is in the top right?"], 30))
  valid = text != tokenizer.PAD
  full = _apply(model)(variables, images, text, valid)

  @jax.jit
  def stepwise(images, text, valid):
    prefix = model.apply(variables, images, method=model.encode_image)
    full_valid = jnp.concatenate([jnp.ones(prefix.shape[:2], bool), valid], axis=1)
    first, cache = model.apply(variables, prefix, text[:, :20], full_valid, method=model.prefill)
    rest = []
    for i in range(20, 29):
      logits, cache = model.apply(variables, text[:, i], prefix.shape[1] + i, cache, full_valid,
                                  method=model.decode_step)
      rest.append(logits)
    return first, jnp.stack(rest, axis=1)

  first, rest = stepwise(images, text, valid)
  np.testing.assert_allclose(first, full[:, 19], atol=1e-4)
  np.testing.assert_allclose(rest, full[:, 20:29], atol=1e-4)


def test_clip_image_tower_loads_into_the_vision_encoder():
  clip = models.CLIP(image_variant="mu/4", text_width=16, text_depth=1, text_heads=2,
                     text_mlp_dim=32, max_text_len=8, embed_dim=16)
  # CLIP's parameter tree, shapes and dtypes (no compilation), with random values.
  rng = np.random.default_rng(0)
  clip_params = jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
      jax.eval_shape(clip.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                     jnp.zeros((1, 8), jnp.int32))["params"])
  model, params = _tiny(**SPLIT)
  loaded = vlm.with_vision_params(params, clip_params["image_tower"])
  for a, b in zip(jax.tree.leaves(loaded["vision"]), jax.tree.leaves(clip_params["image_tower"])):
    np.testing.assert_array_equal(a, b)
  assert loaded["resampler"] is params["resampler"]
  _, mu7 = _tiny()
  with pytest.raises(ValueError, match="shape.*variant"):
    vlm.with_vision_params(mu7, clip_params["image_tower"])
