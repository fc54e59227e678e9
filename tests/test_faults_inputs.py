"""Issue 29 (reliability, round two), input side: foreign weights files, the data
converter, tokenizers and config values out of range. Each fault injected, its outcome
asserted: one line (exit status != 0 where refused), nothing lost, no silent change.
"""
import codecs
import io
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors import numpy as st_numpy

import launch_helpers as lh
import test_trainer
from mmjax.interop import common
from mmjax.interop import diffusers
from mmjax.interop import open_clip as oc
from mmjax.train import guards
from mmjax.train import optim

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CLIP = FIXTURES / "clip" / "quickgelu_p8.safetensors"
CLIP_SPEC = json.loads((FIXTURES / "clip" / "manifest.json").read_text())["models"][
    "quickgelu_p8"]
VAE = FIXTURES / "vae" / "kl_small.safetensors"
VAE_SPEC = json.loads((FIXTURES / "vae" / "manifest.json").read_text())["model"]


def _one_line(e: BaseException, *needles: str) -> str:
  """The message, asserted to be one line holding every needle."""
  message = str(e)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, (needle, message)
  return message


# --- 8. Weights files -------------------------------------------------------------------

def _clip_metadata(**changes) -> str:
  """The metadata `export` writes for the fixture, with dotted fields changed or, for
  the value `None`, removed."""
  config = {k: CLIP_SPEC[k] for k in ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg")}
  config = json.loads(json.dumps(config))
  for field, value in changes.items():
    *parents, last = field.split(".")
    node = config
    for p in parents:
      node = node[p]
    if value is None:
      del node[last]
    else:
      node[last] = value
  return json.dumps(config)


def _write(path, tensors, metadata=None):
  st_numpy.save_file(tensors, path, metadata=metadata)
  return path


@pytest.fixture(scope="module")
def clip_state():
  return st_numpy.load_file(CLIP)


def test_consistent_metadata_is_read(tmp_path, clip_state):
  """The control: an entry as `export` writes it loads, and supplies heads and activation."""
  path = _write(tmp_path / "ok.safetensors", clip_state,
                {oc.METADATA_KEY: _clip_metadata()})
  assert oc.read_config(path)["vision_cfg"]["head_width"] == CLIP_SPEC["vision_cfg"][
      "head_width"]
  model = oc.model_from_file(path)
  assert model.activation == "quick_gelu"
  assert model.text_heads == CLIP_SPEC["text_cfg"]["heads"]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
@pytest.mark.parametrize("reader", ["load", "model_from_file", "read_config", "load_vae"])
def test_integer_or_boolean_tensors_are_refused(tmp_path, clip_state, dtype, reader):
  if reader == "load_vae":
    state, key = st_numpy.load_file(VAE), "decoder.conv_in.bias"
  else:
    state, key = dict(clip_state), "visual.proj"
  state[key] = state[key].astype(dtype)
  path = _write(tmp_path / "int.safetensors", state)
  call = {"load": lambda: oc.load(path, quick_gelu=True),
          "model_from_file": lambda: oc.model_from_file(path, quick_gelu=True),
          "read_config": lambda: oc.read_config(path),
          "load_vae": lambda: diffusers.load_vae(path)}[reader]
  with pytest.raises(common.CheckpointError) as e:
    call()
  _one_line(e.value, str(path), repr(key), "not floating-point", "float32")


def test_openai_integer_scalars_are_still_ignored(tmp_path, clip_state):
  """OpenAI's archives carry integer context_length etc. beside the weights: not refused."""
  state = {**clip_state, "context_length": np.array(16, np.int64),
           "input_resolution": np.array(32, np.int64)}
  model, params = oc.load(_write(tmp_path / "openai.safetensors", state), quick_gelu=True,
                          **CLIP_SPEC["heads"])
  assert model.max_text_len == 16 and "context_length" not in params


@pytest.mark.parametrize("metadata, needles", [
    ("{not json", ["is not JSON"]),
    ("[1, 2]", ["is list, not a JSON object"]),
    ("null", ["is NoneType, not a JSON object"]),
    (_clip_metadata(quick_gelu=None), ["lacks the field 'quick_gelu'"]),
    (_clip_metadata(**{"vision_cfg.head_width": 0}), ["vision_cfg.head_width=0, not an integer"]),
    (_clip_metadata(**{"vision_cfg.head_width": "16"}), ["vision_cfg.head_width='16'"]),
    (_clip_metadata(**{"text_cfg.heads": True}), ["text_cfg.heads=True"]),
    (_clip_metadata(**{"vision_cfg.head_width": 48}), ["head_width=48, which does not divide"]),
    (_clip_metadata(**{"text_cfg.heads": 3}), ["text_cfg.heads=3, which does not divide"]),
    (_clip_metadata(**{"vision_cfg.mlp_ratio": float("nan")}), ["mlp_ratio=nan"]),
    (_clip_metadata(**{"vision_cfg.image_size": 224}),
     ["says vision_cfg.image_size=224, but the tensors' shapes give 32"]),
    (_clip_metadata(**{"text_cfg.layers": 12}), ["says text_cfg.layers=12"]),
    (_clip_metadata(**{"vision_cfg": 5}), ["lacks the field 'vision_cfg.head_width'"]),
    (_clip_metadata(**{"text_cfg.mlp_ratio": 2.0}), ["MLP width of 64"]),
])
@pytest.mark.parametrize("reader", ["read_config", "model_from_file", "load"])
def test_bad_or_contradicting_clip_metadata_is_one_line(tmp_path, clip_state, metadata,
                                                          needles, reader):
  path = _write(tmp_path / "meta.safetensors", clip_state, {oc.METADATA_KEY: metadata})
  with pytest.raises(common.CheckpointError) as e:
    getattr(oc, reader)(path)
  _one_line(e.value, str(path), oc.METADATA_KEY, "Re-export the file", *needles)


def _vae_metadata(**changes):
  return json.dumps({**VAE_SPEC, **changes})


@pytest.mark.parametrize("metadata, needles", [
    ("}", ["is not JSON"]),
    (json.dumps({"in_channels": 3}), ["lacks the field 'norm_num_groups'"]),
    (_vae_metadata(norm_num_groups=0), ["norm_num_groups=0, not an integer >= 1"]),
    (_vae_metadata(norm_num_groups="4"), ["norm_num_groups='4'"]),
    (_vae_metadata(latent_channels=16), ["says latent_channels=16, but the tensors' shapes "
                                         "give 4"]),
    (_vae_metadata(block_out_channels=[8, 16, 16]), ["says block_out_channels=[8, 16, 16]"]),
    (_vae_metadata(layers_per_block=True), ["says layers_per_block=True"]),
])
def test_bad_or_contradicting_vae_metadata_is_one_line(tmp_path, metadata, needles):
  path = _write(tmp_path / "vae.safetensors", st_numpy.load_file(VAE),
                {diffusers.METADATA_KEY: metadata})
  with pytest.raises(common.CheckpointError) as e:
    diffusers.load_vae(path)
  _one_line(e.value, str(path), diffusers.METADATA_KEY, *needles)


def test_vae_metadata_as_export_writes_it_gives_its_groups(tmp_path):
  path = _write(tmp_path / "vae.safetensors", st_numpy.load_file(VAE),
                {diffusers.METADATA_KEY: _vae_metadata()})
  model, _ = diffusers.load_vae(path)
  assert model.groups == VAE_SPEC["norm_num_groups"]
  with pytest.raises(ValueError, match=r"groups=0: GroupNorm's group count"):
    diffusers.load_vae(path, groups=0)


@pytest.mark.parametrize("key, shape", [("visual.conv1.weight", (0, 3, 8, 8)),
                                        ("visual.positional_embedding", (0, 64)),
                                        ("token_embedding.weight", (1000, 0))])
def test_zero_sized_tensors_are_a_shape_error(tmp_path, clip_state, key, shape):
  state = {**clip_state, key: np.zeros(shape, np.float32)}
  path = _write(tmp_path / "zero.safetensors", state)
  with pytest.raises(common.CheckpointError) as e:
    oc.model_from_file(path, quick_gelu=True)
  _one_line(e.value, str(path), repr(key), f"found shape {shape}")


def _error_lines(stderr: str) -> list[str]:
  log = re.compile(r"^([IWE]\d{4} |WARNING: All log messages)")
  return [line for line in stderr.splitlines() if not log.match(line)]


def test_contradicting_metadata_through_init_from_is_one_line(tmp_path, clip_state):
  weights = _write(tmp_path / "vit.safetensors", clip_state,
                   {oc.METADATA_KEY: _clip_metadata(**{"vision_cfg.image_size": 224})})
  proc = lh.run("experiments/clip_mnist.py:smoke", tmp_path / "w", f"init_from={weights}",
                check=False, timeout=180)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = _error_lines(proc.stderr)
  assert lines and lines[-1].startswith(f"error: {weights}: metadata "), lines[-5:]
  assert "says vision_cfg.image_size=224, but the tensors' shapes give 32" in lines[-1]
  assert not lh.checkpoint_steps(tmp_path / "w")


# --- 9. The data converter -------------------------------------------------------------

def _png(array, **save) -> bytes:
  import PIL.Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, format="PNG", **save)
  return buf.getvalue()


def test_16_bit_greyscale_keeps_its_levels():
  from mmjax.data import make_dataset  # pylint: disable=import-outside-toplevel
  ramp8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64, 0 .. 252.
  ramp16 = ramp8.astype(np.uint16) * 257  # The same levels in 16 bits.
  wide = make_dataset.decode_image(_png(ramp16), 64)
  narrow = make_dataset.decode_image(_png(ramp8), 64)
  assert wide.shape == (64, 64, 3) and wide.dtype == np.uint8
  assert np.array_equal(wide, narrow)  # Not all white (255), as PIL's convert gives.
  dark = make_dataset.decode_image(_png(np.full((8, 8), 1000, np.uint16)), 8)
  assert np.all(dark == 4)  # round(1000 / 257)


def test_exif_orientation_is_applied():
  import PIL.Image  # pylint: disable=import-outside-toplevel
  from mmjax.data import make_dataset  # pylint: disable=import-outside-toplevel
  upright = np.zeros((40, 20, 3), np.uint8)  # Tall: red on top, blue below.
  upright[:20, :, 0] = 255
  upright[20:, :, 2] = 255
  stored = np.ascontiguousarray(np.rot90(upright, k=1))  # Wide, as a sideways camera writes.
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 degrees clockwise to display."
  got = make_dataset.decode_image(_png(stored, exif=exif), 20)
  want = make_dataset.decode_image(_png(upright), 20)
  assert np.array_equal(got, want)
  assert not np.array_equal(got, make_dataset.decode_image(_png(stored), 20))


def _folder(tmp_path, captions_name, content: bytes, images=("a.png", "b.png", "c.png")):
  folder = tmp_path / "in"
  folder.mkdir(parents=True)
  for i, name in enumerate(images):
    (folder / name).write_bytes(_png(np.full((8, 8, 3), 30 * i, np.uint8)))
  (folder / captions_name).write_bytes(content)
  return folder


def _read(folder):
  from mmjax.data import make_dataset  # pylint: disable=import-outside-toplevel
  lines = []
  skipped = make_dataset.Skipped(lambda key, reason: lines.append(f"{key}: {reason}"))
  rows = [(key, data is not None, caption)
          for key, data, caption in make_dataset._folder_pairs(str(folder), skipped)]
  return rows, dict(skipped.counts), lines


def test_tsv_in_another_encoding_skips_only_its_bad_lines(tmp_path):
  content = ("file\tcaption\n" "a.png\tplain\n" "b.png\tcaf\u00e9 cr\u00e8me\n"
             "c.png\tna\u00efve\r\n").encode("utf-8")
  content = content.replace("na\u00efve".encode("utf-8"), "na\u00efve".encode("latin-1"))
  rows, counts, lines = _read(_folder(tmp_path, "captions.tsv", content))
  assert rows == [("a.png", True, "plain"), ("b.png", True, "caf\u00e9 cr\u00e8me")]
  assert counts == {"captions line not UTF-8": 1}
  assert lines == ["captions.tsv line 4: captions line not UTF-8 (invalid continuation byte "
                   "at byte 8; save the file as UTF-8)"]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_byte_order_mark_is_read_not_kept(tmp_path, encoding):
  content = "file\tcaption\na.png\tun caf\u00e9\n".encode(encoding)
  rows, counts, _ = _read(_folder(tmp_path, "captions.tsv", content))
  assert rows == [("a.png", True, "un caf\u00e9")] and counts == {}  # The header is a header.
  jsonl = '{"image": "b.png", "caption": "x"}\n'.encode(encoding)
  rows, counts, _ = _read(_folder(tmp_path / "j", "captions.jsonl", jsonl))
  assert rows == [("b.png", True, "x")] and counts == {}


def test_bad_jsonl_lines_are_skipped_each_with_its_reason(tmp_path):
  content = "\n".join([
      '{"image": "a.png", "caption": "first"}',
      '{"image": "b.png", "caption": ',  # Torn.
      '[{"image": "b.png", "caption": "in a list"}, 7]',
      '"just a string"',
      '{"image": 5, "caption": "x"}',
      '{"image": "c.png", "caption": ["not", "text"]}',
      '{"file_name": "c.png", "text": "other names"}',
      '{"image": "c.png", "caption": null}',
  ]).encode()
  rows, counts, lines = _read(_folder(tmp_path, "captions.jsonl", content))
  assert rows == [("a.png", True, "first"), ("b.png", True, "in a list"),
                  ("c.png", True, "other names"), ("c.png", True, "")]
  assert counts == {"captions line not JSON": 1, "captions entry not a JSON object": 2,
                    "captions entry without an image path": 1, "caption not text": 1}
  assert [line.split(":")[0] for line in lines] == [
      "captions.jsonl line 2", "captions.jsonl line 3 item 2", "captions.jsonl line 4",
      "captions.jsonl line 5", "captions.jsonl line 6"]


def test_a_json_array_file_is_read_whole(tmp_path):
  content = json.dumps([{"image": "a.png", "caption": "one"},
                        {"image": "b.png", "caption": "two"}], indent=2).encode()
  rows, counts, _ = _read(_folder(tmp_path, "captions.jsonl", content))
  assert rows == [("a.png", True, "one"), ("b.png", True, "two")] and counts == {}


def test_paths_outside_the_folder_are_refused(tmp_path):
  secret = tmp_path / "secret.png"
  secret.write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
  folder = _folder(tmp_path, "captions.tsv", b"")
  (folder / "sub").mkdir()
  (folder / "escape.png").symlink_to(secret)  # A link out of the folder.
  (folder / "sub" / "inside.png").symlink_to(folder / "a.png")  # A link within it.
  (folder / "up").symlink_to(tmp_path)  # A linked folder out of it.
  names = ["a.png", "../secret.png", str(secret), "sub/../a.png", "escape.png",
           "sub/inside.png", "up/secret.png", "sub/../../secret.png", "a\x00.png"]
  (folder / "captions.tsv").write_text("".join(f"{n}\tcap {i}\n" for i, n in enumerate(names)))
  rows, counts, lines = _read(folder)
  assert rows == [("a.png", True, "cap 0"), ("sub/../a.png", True, "cap 3"),
                  ("sub/inside.png", True, "cap 5")]
  assert counts == {"image path refused": 6}
  assert len(lines) == 6 and all("captions.tsv line" in line for line in lines)
  assert sum("outside the input folder" in line for line in lines) == 4
  assert sum("absolute path" in line for line in lines) == 1
  assert sum("NUL" in line for line in lines) == 1


def test_unreadable_shards_and_non_utf8_captions_are_skipped(tmp_path):
  import tarfile  # pylint: disable=import-outside-toplevel
  from mmjax.data import make_dataset  # pylint: disable=import-outside-toplevel
  good = tmp_path / "good.tar"
  with tarfile.open(good, "w") as tar:
    for key, caption in (("k1", "caf\u00e9".encode()), ("k2", "caf\u00e9".encode("latin-1")),
                         ("k3", "\ufeffbom".encode())):
      for ext, data in ((".png", _png(np.zeros((8, 8, 3), np.uint8))), (".txt", caption)):
        info = tarfile.TarInfo(key + ext)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  torn = tmp_path / "torn.tar"
  torn.write_bytes(good.read_bytes()[:1500])
  lines = []
  skipped = make_dataset.Skipped(lambda key, reason: lines.append(f"{key}: {reason}"))
  pairs = list(make_dataset._shard_pairs([str(good), str(torn)], skipped))
  assert [(k, c) for k, _, c in pairs] == [("good.tar:k1", "caf\u00e9"), ("good.tar:k3", "bom")]
  assert skipped.counts["caption not UTF-8"] == 1
  assert skipped.counts["unreadable tar shard"] == 1
  assert any(line.startswith(f"{torn}: unreadable tar shard") for line in lines)


def _convert_cli(folder, out, *extra):
  return subprocess.run(
      [sys.executable, "-m", "mmjax.data.make_dataset", f"--input={folder}",
       f"--output_dir={out}", "--name=mine", "--val_fraction=0.5", "--image_size=8", *extra],
      cwd=lh.REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("prepared", [True, False])
def test_conversion_into_an_existing_output_is_one_line(tmp_path, prepared):
  folder = _folder(tmp_path, "captions.tsv", b"a.png\tone\nb.png\ttwo\n")
  target = tmp_path / "out" / "mine"
  (target / "1.0.0").mkdir(parents=True)
  (target / "1.0.0" / ("dataset_info.json" if prepared else "notes.txt")).write_text("{}")
  proc = _convert_cli(folder, tmp_path / "out")
  assert proc.returncode == 1 and proc.stdout == ""
  message = (f"{target / '1.0.0'} already holds a prepared dataset: add --overwrite to "
             "replace it (once the new one is complete), or choose another --name or "
             "--output_dir." if prepared else
             f"{target} exists but holds no prepared dataset: remove it, or add --overwrite "
             "to replace it.")
  assert proc.stderr.splitlines() == [f"error: {message}"]
  assert [p.name for p in (target / "1.0.0").iterdir()] == [
      "dataset_info.json" if prepared else "notes.txt"]


@pytest.mark.slow  # Two conversions through TensorFlow (tens of seconds on 2 cores).
def test_conversion_keeps_the_valid_and_never_replaces_silently(tmp_path):
  """One folder with a bit of everything: the valid pairs (an image with two captions
  among them) are converted, each skipped item is one printed line; a second conversion
  into the same place is refused in one line and leaves the dataset as it was;
  --overwrite replaces it."""
  images = tuple(f"{i}.png" for i in range(8))
  rows = [f"{n}\tcaption {i}" for i, n in enumerate(images)]
  rows += ["0.png\tanother caption of 0", "../x.png\tescape", "nope.png\tmissing",
           "1.png\t   "]
  folder = _folder(tmp_path, "captions.tsv",
                   codecs.BOM_UTF8 + ("\n".join(rows) + "\n").encode() + b"7.png\t\xff\n",
                   images=images)
  out = tmp_path / "out"
  first = _convert_cli(folder, out)
  assert first.returncode == 0, first.stderr[-3000:]
  skips = [line for line in first.stdout.splitlines() if line.startswith("skipped ")]
  assert len(skips) == 4, first.stdout
  report = json.loads((out / "mine" / "conversion_report.json").read_text())
  assert sum(report["splits"].values()) == 9  # 8 images, one of them twice.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  keys = sorted(ex["key"].decode() for split in ("train", "validation")
                for ex in tfds.data_source("mine", data_dir=str(out), split=split))
  assert keys == sorted(list(images) + ["0.png#2"])
  before = {p: p.read_bytes() for p in (out / "mine").rglob("*") if p.is_file()}

  again = _convert_cli(folder, out)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines() == [
      f"error: {out / 'mine' / '1.0.0'} already holds a prepared dataset: add --overwrite to "
      "replace it (once the new one is complete), or choose another --name or --output_dir."]
  assert {p: p.read_bytes() for p in (out / "mine").rglob("*") if p.is_file()} == before

  (folder / "captions.tsv").write_text("0.png\tzero\n1.png\tone\n2.png\ttwo\n3.png\tthree\n")
  replaced = _convert_cli(folder, out, "--overwrite")
  assert replaced.returncode == 0, replaced.stderr[-3000:]
  assert "Skipped nothing." in replaced.stdout
  total = sum(len(tfds.data_source("mine", data_dir=str(out), split=split))
              for split in ("train", "validation"))
  assert total == 4 and [p.name for p in out.iterdir()] == ["mine"]  # No staging left.


# --- 10. Tokenizers ---------------------------------------------------------------------

NASTY = [
    "", " ", "\t\n\r", "\x00", "a\x00b", "\ud800", "a\udfffb", "\udbff\udc00",  # Lone
    "\ud83d\ude00",  # and paired surrogates.
    "\ufeffcaption", "\ufffe", "\U0010ffff", "\uffff", "\u200b\u200c\u200d",
    "😀👍🏽👩‍👩‍👧‍👦🏳️‍🌈", "مرحبا بالعالم", "\u202eevil\u202c", "שָׁלוֹם", "e\u0301\u0301\u0301\u0301",
    "Z̸̡̢͓̼a̵l̶g̷o̸", "ﷺ" * 40, "ǅ ß ﬃ İ", "&amp;lt;b&gt;", "<start_of_text>", "<END_OF_TEXT>",
    "a photo of a dog", "A" * 100_000, "ab " * 30_000, "\x85\u2028\u2029", "\x7f\x1b[31m",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "１２３", "🇺🇳" * 500,
]


def _random_strings(n: int, seed: int = 29) -> list[str]:
  """Strings of random code points, surrogates included, of lengths up to 300."""
  rng = np.random.default_rng(seed)
  return ["".join(map(chr, rng.integers(0, 0x110000, rng.integers(0, 300)))) for _ in range(n)]


def _fixed(text: str) -> str:
  """What the tokenizers read: surrogates paired, or U+FFFD alone."""
  from mmjax.data import tokenizer  # pylint: disable=import-outside-toplevel
  return tokenizer.utf8(text).decode("utf-8")


def test_utf8_pairs_surrogates_and_replaces_lone_ones():
  from mmjax.data import tokenizer  # pylint: disable=import-outside-toplevel
  assert tokenizer.utf8("a\ud83d\ude00b") == "a😀b".encode("utf-8")
  assert tokenizer.utf8("\ud800x\udfff") == "\ufffdx\ufffd".encode("utf-8")
  assert tokenizer.utf8("plain é") == "plain é".encode("utf-8")


@pytest.mark.parametrize("max_len", [3, 16, 300])
def test_byte_tokenizer_takes_any_string(max_len):
  from mmjax.data import tokenizer  # pylint: disable=import-outside-toplevel
  tok = tokenizer.ByteTokenizer(max_len)
  texts = NASTY + _random_strings(200)
  out = tok.encode(texts)
  assert out.shape == (len(texts), max_len) and out.dtype == np.int32
  assert np.all(out[:, 0] == tokenizer.BOS) and np.all((0 <= out) & (out < tok.vocab_size))
  for text, row, back in zip(texts, out, tok.decode(out)):
    eos = list(row).index(tokenizer.EOS)  # There, once, and only padding after it.
    assert np.all(row[eos + 1:] == tokenizer.PAD)
    if len(tokenizer.utf8(text)) <= max_len - 2:
      assert back == _fixed(text)  # Whole: the text back, surrogates as read.
    else:
      assert eos == max_len - 1


@pytest.fixture(scope="module")
def clip_tokenizer():
  from mmjax.data import bpe  # pylint: disable=import-outside-toplevel
  return bpe.ClipTokenizer(FIXTURES / "clip" / "bpe_simple_vocab_16e6.txt.gz",
                           context_length=16)


def test_clip_tokenizer_takes_any_string(clip_tokenizer):
  tok = clip_tokenizer
  texts = NASTY + _random_strings(200)
  out = tok.encode(texts)
  assert out.shape == (len(texts), 16) and out.dtype == np.int32
  assert np.all(out[:, 0] == tok.sot_id) and np.all((0 <= out) & (out < tok.vocab_size))
  for row in out:
    ends = np.flatnonzero(row == tok.eot_id)
    assert len(ends) >= 1 and np.all(row[ends[-1] + 1:] == 0)
  assert tok.decode(tok.encode(["a photo of a dog"])) == ["a photo of a dog"]
  # A lone surrogate reads as U+FFFD; a pair as its character.
  assert tok.ids("\ud800") == tok.ids("\ufffd")
  assert tok.ids("\ud83d\ude00") == tok.ids("😀")


def test_clip_tokenizer_cache_is_bounded_and_changes_nothing(clip_tokenizer):
  from mmjax.data import bpe  # pylint: disable=import-outside-toplevel
  small = bpe.ClipTokenizer(FIXTURES / "clip" / "bpe_simple_vocab_16e6.txt.gz",
                            context_length=16, cache_size=8)
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzäöü"), rng.integers(1, 12)))
           for _ in range(2000)]
  texts = [" ".join(words[i:i + 5]) for i in range(0, len(words), 5)] + NASTY
  for text in texts:  # One at a time, as a long run's batches would.
    assert small.ids(text) == clip_tokenizer.ids(text)
  assert small._cached_ids.cache_info().currsize <= 8
  assert clip_tokenizer._cached_ids.cache_info().currsize <= clip_tokenizer.cache_size
  long_word = "x" * 100_000
  before = clip_tokenizer._cached_ids.cache_info().currsize
  clip_tokenizer.ids(long_word + "y")
  assert clip_tokenizer._cached_ids.cache_info().currsize == before  # Not kept at all.


# --- 11. Config values out of range ----------------------------------------------------

def _config(**overrides):
  from mmjax import configs  # pylint: disable=import-outside-toplevel
  c = configs.base_config()
  c.task = "linear"
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.parametrize("field, value, needle", [
    ("optimizer.warmup_steps", -5, "config.optimizer.warmup_steps=-5 (must be an integer >= 0)"),
    ("optimizer.grad_clip_norm", -1.0, "config.optimizer.grad_clip_norm=-1.0 (must be finite "
                                       "and >= 0; 0 for no clipping"),
    ("optimizer.grad_clip_norm", float("inf"), "grad_clip_norm=inf"),
    ("optimizer.weight_decay", -0.01, "config.optimizer.weight_decay=-0.01"),
    ("optimizer.end_factor", -0.5, "config.optimizer.end_factor=-0.5"),
    ("optimizer.b1", 1.0, "config.optimizer.b1=1.0 (must be in [0, 1)"),
    ("optimizer.b1", -0.1, "config.optimizer.b1=-0.1"),
    ("optimizer.b2", 1.5, "config.optimizer.b2=1.5"),
    ("optimizer.b2", float("nan"), "config.optimizer.b2=nan"),
    ("frozen", ("vision/(.*",), "config.frozen pattern 'vision/(.*' is not a regular "
                                "expression (missing ), unterminated subpattern"),
    ("frozen", ("*",), "config.frozen pattern '*' is not a regular expression"),
])
def test_out_of_range_values_are_refused_in_one_line(field, value, needle):
  with pytest.raises(guards.ConfigError) as e:
    guards.validate(_config(**{field: value}), check_dataset=False)
  _one_line(e.value, needle)


def test_every_bad_value_is_named_at_once():
  config = _config(**{"optimizer.b1": 1.0, "optimizer.weight_decay": -1.0,
                      "frozen": ("[",)})
  with pytest.raises(guards.ConfigError) as e:
    guards.validate(config, check_dataset=False)
  _one_line(e.value, "optimizer.b1=1.0", "optimizer.weight_decay=-1.0", "pattern '['")


def test_in_range_values_pass():
  guards.validate(_config(**{"optimizer.warmup_steps": 0, "optimizer.grad_clip_norm": 0.0,
                             "optimizer.b1": 0.0, "optimizer.b2": 0.95,
                             "optimizer.end_factor": 0.0, "optimizer.weight_decay": 0.0,
                             "frozen": ("vision/.*", r"text_tower/block\d+/.*")}),
                  check_dataset=False)


def test_frozen_patterns_that_freeze_everything_are_refused():
  params = {"vision": {"kernel": np.zeros(3)}, "text": {"kernel": np.zeros(3),
                                                        "bias": np.zeros(1)}}
  assert optim.frozen_mask(params, ("vision/.*",)) == {
      "vision": {"kernel": True}, "text": {"kernel": False, "bias": False}}
  for patterns in ((".*",), ("vision/.*", "text/.*")):
    with pytest.raises(ValueError) as e:
      optim.frozen_mask(params, patterns)
    _one_line(e.value, "freezes all 3 parameters: nothing is left to train",
              "top level: ['text', 'vision']")


def test_a_frozen_set_that_freezes_everything_stops_before_the_workdir_fills(tmp_path):
  """Through the trainer: refused where the mask is built (before compiling the step);
  no checkpoint and no metrics are written."""
  with pytest.raises(ValueError, match="nothing is left to train"):
    lh.train(test_trainer.LinearTask, test_trainer._config(frozen=("w", "b")), tmp_path)
  assert not lh.checkpoint_steps(tmp_path) and not (tmp_path / "metrics.jsonl").exists()
