"""Regenerates tests/fixtures/{clip,vae}/: random open_clip CLIPs and a random diffusers VAE.

No weights can be downloaded, so parity with open_clip and diffusers is proven on small
randomly initialised reference models. This script builds them with PyTorch, saves their weights
(safetensors), their embeddings on fixed inputs (.npz) and open_clip's token ids for a few
hundred strings (.json), the keys and shapes of real open_clip sizes (B/32 ... bigG/14,
no weights), copies open_clip's BPE vocabulary, and then checks from the
PyTorch side, running mmjax in another Python (`--mmjax-python`, which needs no PyTorch):

  * mmjax loads each fixture and gives open_clip's embeddings within 1e-5;
  * loading a fixture and exporting it again gives the same tensors, bit for bit;
  * a random mmjax CLIP exported by mmjax loads into open_clip (strict) and open_clip
    gives mmjax's embeddings within 1e-5;
  * mmjax's ClipTokenizer gives open_clip's ids for every string.

For the VAE (tests/fixtures/vae/): a small diffusers AutoencoderKL of the KL-f8 layout
(four levels, two ResnetBlocks per level, mid-block attention, quant convs), its
posterior and decodings on fixed inputs, and the keys and shapes of Stable Diffusion's
real KL-f8 VAE; checked the same way within 1e-4 (load, bit-exact re-export, diffusers
loading mmjax's export).

PyTorch, open_clip and diffusers are never dependencies of mmjax or its tests. Run in
its own environment, from the repository root:

  python3 -m venv /tmp/peer-venv
  /tmp/peer-venv/bin/pip install torch open_clip_torch diffusers safetensors
  /tmp/peer-venv/bin/python tools/make_interop_fixtures.py --mmjax-python .venv/bin/python

(`--only clip` or `--only vae` for one part.) It prints the package versions and writes
them into each folder's manifest.json. The fixtures are deterministic for given package
versions (fixed seeds, CPU).
"""
import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "clip"
VAE_OUT = REPO / "tests" / "fixtures" / "vae"
VOCAB = "bpe_simple_vocab_16e6.txt.gz"
TOLERANCE = 1e-5
VAE_TOLERANCE = 1e-4
# A small AutoencoderKL of the KL-f8 layout; groups: what mmjax must be told.
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 16, 16, 16],
           layers_per_block=2, latent_channels=4, norm_num_groups=4, sample_size=32)
# Stable Diffusion 1.x/2.x's VAE (sd-vae-ft-mse): keys and shapes only.
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256)

# Two small open_clip configurations: QuickGELU with patch 8, GELU with patch 16.
# heads: the head counts mmjax must be told (they are not in the shapes).
MODELS = {
    "quickgelu_p8": dict(
        quick_gelu=True, embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16,
                        mlp_ratio=4.0),
        text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=4, layers=2,
                      mlp_ratio=4.0),
        heads=dict(vision_heads=4, text_heads=4)),
    "gelu_p16": dict(
        quick_gelu=False, embed_dim=24,
        vision_cfg=dict(image_size=48, patch_size=16, width=48, layers=3, head_width=16,
                        mlp_ratio=2.0),
        text_cfg=dict(context_length=12, vocab_size=500, width=32, heads=2, layers=3,
                      mlp_ratio=4.0),
        heads=dict(vision_heads=3, text_heads=2)),
}
TOKENIZER_CONTEXTS = (77, 16)
# Real open_clip sizes whose state-dict keys and shapes (no weights) the tests check the
# loader's size inference and mapping against.
REAL_SIZES = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14")


def tokenizer_strings() -> list[str]:
  """At least 200 varied strings: punctuation, numbers, scripts, HTML, whitespace, long texts."""
  fixed = [
      "", " ", "\t\n ", "a", "A photo of a cat.", "a photo of a dog", "A PHOTO OF A DOG!!!",
      "a diagram", "an image of the number 7", "the number 123456789", "3.14159 and 2,718",
      "it's", "IT'S", "they're we've I'm you'll he'd", "don't won't can't shan't",
      "rock'n'roll", "O'Neill's dog", "'s 't 're", "'S 'T 'RE 'VE 'M 'LL 'D",
      "hello, world", "hello,world", "hello , world", "(parenthesised) [bracketed] {braced}",
      "email@example.com", "https://example.com/path?q=1&r=2#frag", "#hashtag @mention",
      "C++ and C# and F#", "a--b---c", "...", "?!?!", "!!!", "$100.00 €50 £20 ¥1000",
      "50% off", "100°C", "½ cup", "x² + y² = z²", "1st 2nd 3rd 4th", "1,000,000",
      "2026-12-01T12:00:00Z", "phone: +1 (555) 123-4567", "snake_case_name", "kebab-case-name",
      "CamelCaseName", "ALLCAPS", "MiXeD cAsE", "tab\tseparated\tvalues", "new\nline",
      "multiple   spaces   here", "  leading and trailing  ", "non\u00a0breaking\u00a0space",
      "ideographic\u3000space", "zero\u200bwidth", "café", "naïve résumé", "Crème Brûlée",
      "straße", "Ångström", "İstanbul", "ﬁve ﬂowers", "ſtrange long s", "'ſ", "Ǆemal",
      "日本語のテキスト", "中文文本", "한국어 텍스트", "Русский текст", "Ελληνικά",
      "עברית", "العربية", "हिन्दी", "ภาษาไทย", "emoji 😀🐱🚀", "flags 🇫🇷🇯🇵",
      "family 👨‍👩‍👧", "skin tone 👍🏽", "&amp; &lt;tag&gt; &quot;quoted&quot;",
      "&amp;amp; double escaped", "&#39;numeric&#39; &#x27;hex&#x27;", "<b>bold</b> html",
      "&nbsp;nbsp", "cafÃ© mojibake", "â€œsmart quotesâ€\x9d", "“curly” ‘quotes’",
      "em—dash en–dash", "ellipsis…", "« guillemets »", "<start_of_text>", "<end_of_text>",
      "x <start_of_text> y", "a<<start_of_text>", "<START_OF_TEXT> upper",
      "control\x01chars\x7f", "\ufeffbyte order mark", "a" * 100, "ab" * 60,
      "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
      "0", "00000", "1234567890" * 5, "v1.2.3-beta+build.5", "3x3 grid, 28x28 pixels",
      "the quick brown fox jumps over the lazy dog", "THE QUICK BROWN FOX",
  ]
  long_texts = [
      " ".join(["a photo of a cat sitting on a mat"] * 12),
      "This is a long caption. " * 30,
      ", ".join(str(i) for i in range(80)),
      " ".join(["日本語"] * 60),
      "word " * 75 + "end",
      "🐱" * 40,
  ]
  rng = np.random.default_rng(16)
  pieces = ["cat", "dog", "a", "the", "photo", "of", "Image", "RED", "blue", "42", "7", "3.5",
            ",", ".", "!", "?", "'s", "'re", "-", "/", "&amp;", "é", "ü", "ß", "ø", "中", "語",
            "😀", "🚀", "  ", "\t", "\n", "(", ")", "\"", "%", "#", "@", "…", "’", "х", "ω",
            "number", "digit", "handwritten", "zero", "one", "two", "NINE", "don't", "it's"]
  generated = []
  while len(fixed) + len(long_texts) + len(generated) < 230:
    n = int(rng.integers(1, 25))
    words = rng.choice(pieces, size=n)
    seps = rng.choice(["", " ", " ", " ", "  "], size=n)
    generated.append("".join(w + s for w, s in zip(words, seps)))
  return fixed + long_texts + generated


# --- the mmjax side: runs in --mmjax-python, imports no PyTorch ---

def mmjax_side(work: pathlib.Path) -> None:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from mmjax.data import bpe  # pylint: disable=import-outside-toplevel
  from mmjax.interop import open_clip as oc  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")
  report = {"versions": {p: importlib.metadata.version(p) for p in
                         ("jax", "flax", "numpy", "safetensors", "tokenizers", "ftfy", "regex")}}
  for name, spec in MODELS.items():
    data = np.load(OUT / f"{name}.npz")
    model, params = oc.load(OUT / f"{name}.safetensors", quick_gelu=spec["quick_gelu"],
                            **spec["heads"])
    out = model.apply({"params": params}, data["images_nhwc"], data["tokens"])
    np.savez(work / f"{name}_mmjax.npz", image_emb=out["image_emb"], text_emb=out["text_emb"])
    oc.export(params, model, work / f"{name}_reexport.safetensors")
    # A random mmjax CLIP of the same architecture, exported for open_clip to load.
    params = model.init(jax.random.PRNGKey(1), data["images_nhwc"], data["tokens"])["params"]
    params = jax.tree.map(lambda x, k: x + 0.05 * jax.random.normal(k, x.shape), params,
                          _split_like(jax.random.PRNGKey(2), params))
    out = model.apply({"params": params}, data["images_nhwc"], data["tokens"])
    np.savez(work / f"{name}_random_mmjax.npz", image_emb=out["image_emb"],
             text_emb=out["text_emb"])
    oc.export(params, model, work / f"{name}_random.safetensors")
  fixture = json.loads((OUT / "tokenizer.json").read_text("utf-8"))
  report["tokenizer"] = {}
  for ctx in TOKENIZER_CONTEXTS:
    tok = bpe.ClipTokenizer(OUT / VOCAB, context_length=ctx)
    report["tokenizer"][str(ctx)] = tok.encode(fixture["texts"]).tolist()
  (work / "mmjax_report.json").write_text(json.dumps(report))


def vae_mmjax_side(work: pathlib.Path) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from mmjax.interop import diffusers  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")
  data = np.load(VAE_OUT / "kl_small.npz")
  model, params = diffusers.load_vae(VAE_OUT / "kl_small.safetensors",
                                     groups=VAE["norm_num_groups"])
  np.savez(work / "vae_mmjax.npz", **_vae_outputs(model, params, data))
  diffusers.export_vae(params, model, work / "vae_reexport.safetensors")
  params = model.init(jax.random.PRNGKey(1), data["images_nhwc"])["params"]
  params = jax.tree.map(lambda x, k: x + 0.05 * jax.random.normal(k, x.shape), params,
                        _split_like(jax.random.PRNGKey(2), params))
  np.savez(work / "vae_random_mmjax.npz", **_vae_outputs(model, params, data))
  diffusers.export_vae(params, model, work / "vae_random.safetensors")


def _vae_outputs(model, params, data) -> dict:
  """mmjax's posterior mean/logvar of the images, decodings of the mean and of the latents."""
  variables = {"params": params}
  mean, logvar = model.apply(variables, data["images_nhwc"], method=model.encode)
  return {"mean": mean, "logvar": logvar,
          "reconstruction": model.apply(variables, mean, method=model.decode),
          "decoded": model.apply(variables, data["latents_nhwc"], method=model.decode)}


def _split_like(key, tree):
  import jax  # pylint: disable=import-outside-toplevel
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


# --- the PyTorch side ---

def _open_clip_model(spec: dict):
  import open_clip  # pylint: disable=import-outside-toplevel
  return open_clip.model.CLIP(spec["embed_dim"], vision_cfg=dict(spec["vision_cfg"]),
                              text_cfg=dict(spec["text_cfg"]), quick_gelu=spec["quick_gelu"])


def _embeddings(model, images_nhwc, tokens):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    images = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    tokens = torch.from_numpy(tokens.astype(np.int64))
    return {"image_features": model.encode_image(images).numpy(),
            "text_features": model.encode_text(tokens).numpy(),
            "image_emb": model.encode_image(images, normalize=True).numpy(),
            "text_emb": model.encode_text(tokens, normalize=True).numpy()}


def _tokens(rng, spec, rows):
  """[rows, ctx] ids as a tokenizer lays them out: start, ids, end (the highest id), zeros."""
  ctx, vocab = spec["text_cfg"]["context_length"], spec["text_cfg"]["vocab_size"]
  out = np.zeros((rows, ctx), np.int32)
  for i in range(rows):
    n = ctx - 2 if i == 0 else int(rng.integers(0, ctx - 1))
    out[i, 0] = vocab - 2
    out[i, 1:1 + n] = rng.integers(1, vocab - 2, n)
    out[i, 1 + n] = vocab - 1
  return out


def _write_tokenizer_json(path, texts, ids):
  """{"vocab", "texts", "ids": {context length: rows without trailing zeros}}, a row a line."""
  def rows(items):
    return ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in items)
  ids_text = ",\n".join(f' "{ctx}": [\n{rows(r)}\n ]' for ctx, r in ids.items())
  path.write_text(f'{{"vocab": {json.dumps(VOCAB)},\n"texts": [\n{rows(texts)}\n],\n'
                  f'"ids": {{\n{ids_text}\n}}}}\n', "utf-8")


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_side(mmjax_python: str) -> None:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import open_clip  # pylint: disable=import-outside-toplevel
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  versions = {"python": sys.version.split()[0]}
  versions.update({p: importlib.metadata.version(p) for p in
                   ("torch", "open_clip_torch", "safetensors", "numpy", "ftfy", "regex")})
  print("reference packages:", json.dumps(versions))
  OUT.mkdir(parents=True, exist_ok=True)

  # Tokenizer: open_clip's vocabulary file and its ids for the strings.
  vocab_src = pathlib.Path(open_clip.tokenizer.default_bpe())
  shutil.copyfile(vocab_src, OUT / VOCAB)
  texts = tokenizer_strings()
  ids = {}
  for ctx in TOKENIZER_CONTEXTS:
    rows = open_clip.tokenize(texts, context_length=ctx).numpy()
    ids[str(ctx)] = [[int(t) for t in np.trim_zeros(r, "b")] for r in rows]
  _write_tokenizer_json(OUT / "tokenizer.json", texts, ids)

  # Real sizes: the keys and shapes of open_clip's state dicts, built on the meta device.
  real = {}
  for name in REAL_SIZES:
    config = open_clip.get_model_config(name)
    with torch.device("meta"):
      model = open_clip.model.CLIP(**config)
    real[name] = {"config": config,
                  "shapes": {k: list(v.shape) for k, v in model.state_dict().items()}}
  (OUT / "open_clip_shapes.json").write_text(
      "{\n" + ",\n".join(f"{json.dumps(n)}: {json.dumps(r)}" for n, r in real.items())
      + "\n}\n")

  # Models: random open_clip CLIPs, every parameter perturbed so that each one matters.
  reference = {}
  for i, (name, spec) in enumerate(MODELS.items()):
    torch.manual_seed(i)
    model = _open_clip_model(spec).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    safetensors.torch.save_file(model.state_dict(), str(OUT / f"{name}.safetensors"))
    rng = np.random.default_rng(i)
    size = spec["vision_cfg"]["image_size"]
    images = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    tokens = _tokens(rng, spec, 4)
    emb = _embeddings(model, images, tokens)
    reference[name] = emb
    np.savez_compressed(OUT / f"{name}.npz", images_nhwc=images, tokens=tokens,
                        logit_scale=model.logit_scale.detach().numpy(), **emb)

  # The mmjax side, in its own Python.
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    subprocess.run([mmjax_python, __file__, "--mmjax-side", str(work), "--only", "clip"],
                   check=True, env=env, cwd=REPO)
    report = json.loads((work / "mmjax_report.json").read_text())
    print("mmjax packages:", json.dumps(report["versions"]))
    checks = {}
    for name, spec in MODELS.items():
      ours = np.load(work / f"{name}_mmjax.npz")
      diff = max(_max_diff(ours[k], reference[name][k]) for k in ("image_emb", "text_emb"))
      assert diff <= TOLERANCE, f"{name}: mmjax's embeddings differ from open_clip's by {diff}"
      original = safetensors.torch.load_file(str(OUT / f"{name}.safetensors"))
      again = safetensors.torch.load_file(str(work / f"{name}_reexport.safetensors"))
      assert original.keys() == again.keys(), set(original) ^ set(again)
      for key in original:
        assert torch.equal(original[key], again[key]), f"{name}: {key} changed in the round trip"
      # open_clip loads mmjax's export of a random mmjax model (strictly) and agrees.
      exported = work / f"{name}_random.safetensors"
      with safetensors.safe_open(str(exported), "pt") as f:
        config = json.loads(f.metadata()["mmjax.open_clip_config"])
      model = _open_clip_model(config).eval()
      open_clip.load_checkpoint(model, str(exported), strict=True)
      data = np.load(OUT / f"{name}.npz")
      theirs = _embeddings(model, data["images_nhwc"], data["tokens"])
      mine = np.load(work / f"{name}_random_mmjax.npz")
      export_diff = max(_max_diff(mine[k], theirs[k]) for k in ("image_emb", "text_emb"))
      assert export_diff <= TOLERANCE, (
          f"{name}: open_clip on mmjax's export differs from mmjax by {export_diff}")
      checks[name] = {"load_max_abs_diff": diff, "export_max_abs_diff": export_diff,
                      "reexport_bit_exact": True}
      print(f"{name}: load {diff:.2e}, export {export_diff:.2e}, re-export exact")
    for ctx in TOKENIZER_CONTEXTS:
      theirs = ids[str(ctx)]
      mine = [[int(t) for t in np.trim_zeros(np.array(row), "b")]
              for row in report["tokenizer"][str(ctx)]]
      wrong = [texts[j] for j, (a, b) in enumerate(zip(mine, theirs)) if a != b]
      assert not wrong, f"context {ctx}: mmjax's ids differ for {len(wrong)} texts: {wrong[:5]}"
    print(f"tokenizer: {len(texts)} strings, ids equal at context lengths {TOKENIZER_CONTEXTS}")

  files = sorted(p for p in OUT.iterdir() if p.name != "manifest.json" and p.is_file())
  manifest = {
      "generated_by": "tools/make_interop_fixtures.py",
      "reference_versions": versions, "mmjax_side_versions": report["versions"],
      "tolerance": TOLERANCE, "checks": checks,
      "models": {name: {k: v for k, v in spec.items()} for name, spec in MODELS.items()},
      "tokenizer": {"strings": len(texts), "context_lengths": list(TOKENIZER_CONTEXTS)},
      "real_sizes": list(REAL_SIZES),
      "files": {p.name: {"bytes": p.stat().st_size,
                         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files},
  }
  (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  total = sum(p.stat().st_size for p in OUT.iterdir())
  print(f"wrote {OUT.relative_to(REPO)}: {len(files) + 1} files, {total / 1e6:.2f} MB")


def _vae_reference_outputs(model, images_nhwc, latents_nhwc) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  nhwc = lambda x: x.numpy().transpose(0, 2, 3, 1)
  with torch.no_grad():
    posterior = model.encode(nchw(images_nhwc)).latent_dist
    return {"mean": nhwc(posterior.mean), "logvar": nhwc(posterior.logvar),
            "reconstruction": nhwc(model.decode(posterior.mean).sample),
            "decoded": nhwc(model.decode(nchw(latents_nhwc)).sample)}


def vae_torch_side(mmjax_python: str) -> None:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  versions = {"python": sys.version.split()[0]}
  versions.update({p: importlib.metadata.version(p) for p in
                   ("torch", "diffusers", "safetensors", "numpy")})
  print("reference packages:", json.dumps(versions))
  VAE_OUT.mkdir(parents=True, exist_ok=True)
  with torch.device("meta"):
    sd = diffusers.AutoencoderKL(**SD_VAE)
  shapes = ",\n".join(f"{json.dumps(k)}: {json.dumps(list(v.shape))}"
                     for k, v in sd.state_dict().items())
  (VAE_OUT / "sd_kl_f8_shapes.json").write_text(
      f'{{"config": {json.dumps(SD_VAE)},\n"shapes": {{\n{shapes}\n}}}}\n')
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**VAE).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  safetensors.torch.save_file(model.state_dict(), str(VAE_OUT / "kl_small.safetensors"))
  rng = np.random.default_rng(0)
  size, f = VAE["sample_size"], 2 ** (len(VAE["block_out_channels"]) - 1)
  images = rng.uniform(-1, 1, size=(2, size, size, 3)).astype(np.float32)
  latents = rng.normal(size=(2, size // f, size // f, 4)).astype(np.float32)
  reference = _vae_reference_outputs(model, images, latents)
  np.savez_compressed(VAE_OUT / "kl_small.npz", images_nhwc=images, latents_nhwc=latents,
                      **reference)

  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    subprocess.run([mmjax_python, __file__, "--mmjax-side", str(work), "--only", "vae"],
                   check=True, env=env, cwd=REPO)
    ours = np.load(work / "vae_mmjax.npz")
    diff = max(_max_diff(ours[k], reference[k]) for k in reference)
    assert diff <= VAE_TOLERANCE, f"VAE: mmjax's outputs differ from diffusers' by {diff}"
    original = safetensors.torch.load_file(str(VAE_OUT / "kl_small.safetensors"))
    again = safetensors.torch.load_file(str(work / "vae_reexport.safetensors"))
    assert original.keys() == again.keys(), set(original) ^ set(again)
    for key in original:
      assert torch.equal(original[key], again[key]), f"VAE: {key} changed in the round trip"
    exported = work / "vae_random.safetensors"
    with safetensors.safe_open(str(exported), "pt") as f:
      config = json.loads(f.metadata()["mmjax.diffusers_config"])
    theirs_model = diffusers.AutoencoderKL(**config).eval()
    theirs_model.load_state_dict(safetensors.torch.load_file(str(exported)), strict=True)
    theirs = _vae_reference_outputs(theirs_model, images, latents)
    mine = np.load(work / "vae_random_mmjax.npz")
    export_diff = max(_max_diff(mine[k], theirs[k]) for k in theirs)
    assert export_diff <= VAE_TOLERANCE, (
        f"VAE: diffusers on mmjax's export differs from mmjax by {export_diff}")
  print(f"vae: load {diff:.2e}, export {export_diff:.2e}, re-export exact")
  files = sorted(p for p in VAE_OUT.iterdir() if p.name != "manifest.json" and p.is_file())
  manifest = {
      "generated_by": "tools/make_interop_fixtures.py", "reference_versions": versions,
      "tolerance": VAE_TOLERANCE, "model": VAE, "real_size": SD_VAE,
      "checks": {"load_max_abs_diff": diff, "export_max_abs_diff": export_diff,
                 "reexport_bit_exact": True},
      "files": {p.name: {"bytes": p.stat().st_size,
                         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files},
  }
  (VAE_OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  total = sum(p.stat().st_size for p in VAE_OUT.iterdir())
  print(f"wrote {VAE_OUT.relative_to(REPO)}: {len(files) + 1} files, {total / 1e6:.2f} MB")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mmjax-python", default=os.environ.get("MMJAX_PYTHON"),
                      help="a Python with mmjax's dependencies (JAX, no PyTorch needed); "
                      "default: $MMJAX_PYTHON")
  parser.add_argument("--only", choices=("clip", "vae"), help="regenerate one part only")
  parser.add_argument("--mmjax-side", metavar="DIR", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.mmjax_side:
    sys.path.insert(0, str(REPO))
    if args.only != "vae":
      mmjax_side(pathlib.Path(args.mmjax_side))
    if args.only != "clip":
      vae_mmjax_side(pathlib.Path(args.mmjax_side))
    return
  if not args.mmjax_python:
    parser.error("give --mmjax-python (e.g. .venv/bin/python), the Python that runs mmjax.")
  if args.only != "vae":
    torch_side(args.mmjax_python)
  if args.only != "clip":
    vae_torch_side(args.mmjax_python)


if __name__ == "__main__":
  main()
