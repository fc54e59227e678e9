"""Regenerates tests/fixtures/hf_clip/: random transformers CLIPModel and SiglipModel folders.

No weights can be downloaded, so parity with transformers is proven on small randomly
initialised reference models. This script builds two CLIPModels (QuickGELU with patch 8 and
the text pooled at its end-of-text id; GELU with patch 16 and the legacy `eos_token_id` 2,
pooled at the highest id) and two SiglipModels (tanh GELU with patch 8; exact GELU with
patch 4), every parameter perturbed so that each one matters, and `save_pretrained`s each
into its own folder (config.json + model.safetensors, exactly what users have on disk),
with the embeddings and logits of fixed inputs (.npz). The first CLIP folder also holds a
small CLIPTokenizer (CLIP's byte-level BPE cut to its first merges) saved by
`save_pretrained`, and tokenizer_ids.json its ids for a few prompts. Then, from the
PyTorch side, running mmjax in another Python (`--mmjax-python`, which needs no PyTorch):

  * mmjax loads each folder and gives transformers' embeddings within 1e-5;
  * mmjax's export of what it loaded is a folder transformers loads (no missing or
    unexpected key) and that gives the same embeddings and logits within 1e-5;
  * mmjax's tokenizer gives CLIPTokenizer's ids, from tokenizer.json and from vocab.json
    with merges.txt alone.

PyTorch and transformers are never dependencies of mmjax or its tests. From the repository
root, with an environment that has torch and transformers:

  /tmp/peer-venv/bin/python tools/make_hf_fixtures.py --mmjax-python .venv/bin/python
"""
import argparse
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "hf_clip"
BPE_VOCAB = REPO / "tests" / "fixtures" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
TOLERANCE = 1e-5
NUM_MERGES = 300  # The tiny tokenizer's merges: CLIP's first ones.
TOKENIZER_FOLDER = "clip_quickgelu_p8"
CONTEXTS = (16, 77)
PROMPTS = ["a photo of a cat.", "A PHOTO OF A DOG!!", "the number 7", "an image of a 'seven'",
           "  multiple   spaces\tand\nnewlines ", "café naïve", "a handwritten digit zero",
           " ".join(["a photo of a cat sitting on the mat"] * 6), "", "<|endoftext|> inside"]


def _clip(vision, text, projection_dim):
  return dict(kind="clip", vision=vision, text=text, projection_dim=projection_dim)


MODELS = {
    "clip_quickgelu_p8": _clip(
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8, hidden_act="quick_gelu"),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=16, hidden_act="quick_gelu"), 24),
    "clip_gelu_p16": _clip(
        dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
             image_size=48, patch_size=16, hidden_act="gelu"),
        dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=12, hidden_act="gelu", eos_token_id=2), 16),
    "siglip_p8": dict(
        kind="siglip",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=32, patch_size=8),
        text=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=12)),
    "siglip_gelu_p4": dict(
        kind="siglip",
        vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                    num_attention_heads=3, image_size=16, patch_size=4, hidden_act="gelu",
                    layer_norm_eps=1e-5),
        text=dict(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=2, max_position_embeddings=10, hidden_act="gelu",
                  layer_norm_eps=1e-5, projection_size=24)),
}


# --- The mmjax side (no PyTorch) ---

def mmjax_side(work: pathlib.Path) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from mmjax.interop import hf_clip, hf_tokenizer, load_pretrained
  for name in MODELS:
    pre = load_pretrained(OUT / name)
    data = np.load(OUT / f"{name}.npz")
    out = jax.jit(pre.model.apply)({"params": pre.params}, data["images_nhwc"], data["tokens"])
    np.savez(work / f"{name}_mmjax.npz", image_emb=out["image_emb"], text_emb=out["text_emb"])
    hf_clip.export(pre.params, pre.model, work / f"{name}_export")
  ids = {}
  only_bpe = work / "bpe_only"
  only_bpe.mkdir()
  for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copy(OUT / TOKENIZER_FOLDER / f, only_bpe / f)
  for label, folder in (("tokenizer.json", OUT / TOKENIZER_FOLDER), ("bpe", only_bpe)):
    for ctx in CONTEXTS:
      tok = hf_tokenizer.PretrainedTokenizer(folder, ctx)
      ids[f"{label}/{ctx}"] = tok.encode(PROMPTS).tolist()
  (work / "mmjax_tokenizer.json").write_text(json.dumps(ids))


# --- The PyTorch side ---

def _tiny_tokenizer(folder: pathlib.Path):
  """A CLIPTokenizer on CLIP's byte-level BPE cut to its first NUM_MERGES merges."""
  import transformers  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO))
  from mmjax.data import bpe  # pylint: disable=import-outside-toplevel
  with gzip.open(BPE_VOCAB, "rt", encoding="utf-8") as f:
    merges = f.read().split("\n")[1:NUM_MERGES + 1]
  symbols = list(bpe.bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  with tempfile.TemporaryDirectory() as tmp:
    (pathlib.Path(tmp) / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (pathlib.Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(vocab=str(pathlib.Path(tmp) / "vocab.json"),
                                     merges=str(pathlib.Path(tmp) / "merges.txt"))
    tok.save_pretrained(folder)  # tokenizer.json and tokenizer_config.json.
    for name in ("vocab.json", "merges.txt"):  # As older versions also wrote them.
      shutil.copy(pathlib.Path(tmp) / name, folder / name)
  return transformers.AutoTokenizer.from_pretrained(folder), len(vocab)


def _build(spec, vocab_size, eos_id):
  import transformers  # pylint: disable=import-outside-toplevel
  if spec["kind"] == "clip":
    text = {"vocab_size": vocab_size, "eos_token_id": eos_id, "bos_token_id": eos_id - 1,
            "pad_token_id": eos_id, **spec["text"]}
    config = transformers.CLIPConfig(text_config=text, vision_config=spec["vision"],
                                     projection_dim=spec["projection_dim"])
    return transformers.CLIPModel(config)
  text = {"pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None, **spec["text"]}
  config = transformers.SiglipConfig(text_config=text, vision_config=spec["vision"])
  return transformers.SiglipModel(config)


def _inputs(rng, model, spec):
  t, v = model.config.text_config, model.config.vision_config
  images = rng.normal(size=(3, v.image_size, v.image_size, 3)).astype(np.float32)
  n = t.max_position_embeddings
  tokens = rng.integers(0, t.vocab_size, size=(4, n)).astype(np.int64)
  if spec["kind"] == "clip":  # Start, text, end (the highest id), then padding.
    eos = t.vocab_size - 1
    tokens = np.minimum(tokens, eos - 2)
    for row, length in zip(tokens, (3, n // 2, n - 1, n)):
      row[0], row[length - 1], row[length:] = eos - 1, eos, eos
  return images, tokens


def _outputs(model, images, tokens) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return {"image_emb": out.image_embeds.numpy(), "text_emb": out.text_embeds.numpy(),
          "logits_per_image": out.logits_per_image.numpy()}


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_side(mmjax_python: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  versions = {"torch": torch.__version__, "transformers": transformers.__version__}
  print("reference packages:", json.dumps(versions))
  if OUT.exists():
    shutil.rmtree(OUT)
  OUT.mkdir(parents=True)
  tokenizer, vocab_size = _tiny_tokenizer(OUT / TOKENIZER_FOLDER)
  eos_id = vocab_size - 1
  ids = {str(ctx): tokenizer(PROMPTS, padding="max_length", truncation=True,
                             max_length=ctx)["input_ids"] for ctx in CONTEXTS}
  (OUT / "tokenizer_ids.json").write_text(json.dumps({"prompts": PROMPTS, "ids": ids}) + "\n")

  reference, manifest = {}, {"versions": versions, "models": {}}
  for i, (name, spec) in enumerate(MODELS.items()):
    torch.manual_seed(i)
    model = _build(spec, vocab_size, eos_id).eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(OUT / name)
    rng = np.random.default_rng(i)
    images, tokens = _inputs(rng, model, spec)
    reference[name] = _outputs(model, images, tokens)
    extra = {"logit_bias": model.logit_bias.detach().numpy()} if spec["kind"] == "siglip" else {}
    np.savez_compressed(OUT / f"{name}.npz", images_nhwc=images, tokens=tokens.astype(np.int32),
                        logit_scale=model.logit_scale.detach().numpy(), **extra,
                        **reference[name])
    manifest["models"][name] = {"kind": spec["kind"], "config": model.config.to_diff_dict()}

  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    subprocess.run([mmjax_python, __file__, "--mmjax-side", str(work)], check=True, env=env,
                   cwd=REPO)
    checks = {}
    for name, spec in MODELS.items():
      ours = np.load(work / f"{name}_mmjax.npz")
      load_diff = max(_max_diff(ours[k], reference[name][k]) for k in ("image_emb", "text_emb"))
      assert load_diff <= TOLERANCE, f"{name}: mmjax differs from transformers by {load_diff}"
      cls = transformers.CLIPModel if spec["kind"] == "clip" else transformers.SiglipModel
      exported, info = cls.from_pretrained(work / f"{name}_export", output_loading_info=True)
      bad = {k: v for k, v in info.items() if v}
      assert not bad, f"{name}: transformers loading mmjax's export: {bad}"
      data = np.load(OUT / f"{name}.npz")
      again = _outputs(exported.eval(), data["images_nhwc"], data["tokens"].astype(np.int64))
      export_diff = max(_max_diff(again[k], reference[name][k]) for k in again)
      assert export_diff <= TOLERANCE, f"{name}: export differs by {export_diff}"
      checks[name] = {"load_max_abs_diff": load_diff, "export_max_abs_diff": export_diff}
      print(f"{name}: load {load_diff:.2e}, transformers on the export {export_diff:.2e}")
    mine = json.loads((work / "mmjax_tokenizer.json").read_text())
    for key, rows in mine.items():
      assert rows == ids[key.split("/")[1]], f"tokenizer ids differ ({key})"
    print(f"tokenizer: {len(PROMPTS)} prompts x {len(CONTEXTS)} lengths equal, from "
          "tokenizer.json and from vocab.json + merges.txt")
  manifest["checks"] = checks
  (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
  print(f"wrote {OUT.relative_to(REPO)} ({total / 1e6:.2f} MB)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mmjax-python", help="A Python with mmjax's dependencies (no torch).")
  parser.add_argument("--mmjax-side", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.mmjax_side:
    mmjax_side(pathlib.Path(args.mmjax_side))
  elif not args.mmjax_python:
    parser.error("--mmjax-python is required (the Python that runs mmjax's side).")
  else:
    torch_side(args.mmjax_python)


if __name__ == "__main__":
  main()
