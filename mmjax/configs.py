"""Shared pieces of experiment configs (`experiments/*.py`)."""
import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults):
  """Parses a config argument like "smoke,model=small_cnn" against typed defaults.

  A bare name sets a bool default to True. Unknown keys are an error that lists the
  known ones. Returns an immutable ConfigDict of the result.
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}.")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return ml_collections.FrozenConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """The fields every experiment has, so that scripts can rely on them."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0
  c.global_batch_size = 128
  c.eval_batch_size = 1024
  c.num_train_steps = 1000
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  # Stop (like on NaN) when the training loss exceeds this; None: no limit.
  c.max_loss = config_dict.placeholder(float)
  # A restart may change num_train_steps (and so the schedule) only when this is True.
  c.allow_schedule_change = False
  # Optimizer fields (guards.RESUMABLE) a restart may change, comma-separated, e.g.
  # "optimizer.learning_rate" to resume after a loss spike with a lower rate.
  c.resume_changes = ""
  # Throughput: train/mfu needs the device's peak dense TFLOP/s (known for common GPUs
  # and TPUs, see mmjax/train/throughput.py); profile_steps = (first step, count) writes
  # a jax.profiler trace into <workdir>/profile.
  c.peak_tflops_per_device = config_dict.placeholder(float)
  c.profile_steps = ()
  # Evaluators, each config.evals.<name> = dict(type=..., every_steps=..., ...): see
  # mmjax/evals/__init__.py. every_steps defaults to eval_every_steps.
  c.evals = ml_collections.ConfigDict()
  # Regexes over parameter paths ("vision/.*"): those leaves get no update, no optimizer
  # state and no weight decay.
  c.frozen = ()
  # Fine-tuning (mmjax/tasks/adapted.py, docs/lora.md). lora: low-rank adapters beside
  # the kernels whose paths match `targets` (regexes), scaled by alpha / rank (alpha 0:
  # rank); only they train, and the base parameters matching `train` (regexes: PEFT's
  # modules_to_save, e.g. LayerNorms); rank 0 is off. warm_start: parameters matching
  # `include` start from the latest checkpoint of the run in `workdir` (its parameters,
  # or with source="ema" its EMA weights, as released diffusion weights are); those
  # matching `reinit` start from the random initialisation even when loaded.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=(), dropout=0.0,
                                          train=()))
  c.warm_start = ml_collections.ConfigDict(dict(workdir="", include=(".*",), reinit=(),
                                                source="params"))
  # The device mesh: data x fsdp devices (-1: the rest). The batch splits over both;
  # parameters and optimizer state of at least fsdp_min_size elements split along fsdp
  # (mmjax/parallel.py). grad_accum_steps micro-batches make one update.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.fsdp_min_size = 2 ** 16
  c.grad_accum_steps = 1
  # Precision and memory (mmjax/nn/precision.py): the models' computation dtype and
  # parameter dtype ("float32", "bfloat16" or "float16"; softmax, norm statistics,
  # logits and losses stay float32); remat: "none", "full" or a jax.checkpoint_policies
  # name (e.g. "dots_with_no_batch_dims_saveable"), recomputing each Transformer / U-Net
  # block in the backward pass; scan_layers: one scanned block per ViT / text encoder
  # (clip and ldm tasks; another parameter layout).
  c.dtype = "float32"
  c.param_dtype = "float32"
  c.remat = "none"
  c.scan_layers = False
  # launch.py: glibc keeps the memory XLA frees (mmjax/train/host.py). Large steps gain
  # (CLIP MNIST +35% on 2 cores); steps of a few ms lose to its single malloc arena.
  c.reuse_host_memory = True

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "mnist"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  c.dataset.download = True  # Prepare the dataset if it is missing (needs internet).
  c.dataset.cache_decoded = True  # Decode the whole split once, keep it in memory.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.end_factor = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 0.0
  # Layer-wise learning-rate decay: each Transformer block's rate times
  # layer_decay ** (depth - layer), embeddings lowest; 1.0 is off (mmjax/train/optim.py).
  c.optimizer.layer_decay = 1.0
  # Clipping and moments over one flat vector of all trained parameters: faster on a
  # CPU for models of many small leaves; not with mesh.fsdp > 1 (mmjax/train/optim.py).
  c.optimizer.flatten = False
  return c


def set_steps(c: ml_collections.ConfigDict, *, batch: int, steps: int, log_every: int,
              eval_every: int, checkpoint_every: int,
              eval_batch: int | None = None) -> ml_collections.ConfigDict:
  """Sets the global batch size (and the evaluation batch size, if given), the number
  of training steps, and how often to log, evaluate and checkpoint, in place."""
  c.global_batch_size = batch
  if eval_batch is not None:
    c.eval_batch_size = eval_batch
  c.num_train_steps = steps
  c.log_every_steps = log_every
  c.eval_every_steps = eval_every
  c.checkpoint_every_steps = checkpoint_every
  return c


def set_optimizer(c: ml_collections.ConfigDict, name: str,
                  **fields) -> ml_collections.ConfigDict:
  """Sets config.optimizer.name and the given fields of config.optimizer (learning_rate,
  warmup_steps, weight_decay, ...; see `base_config`), in place."""
  unknown = sorted(set(fields) - set(c.optimizer))
  if unknown:
    raise ValueError(f"Unknown optimizer fields {unknown}; known: {sorted(c.optimizer)}.")
  c.optimizer.name = name
  for key, value in fields.items():
    c.optimizer[key] = value
  return c


def apply_smoke(c: ml_collections.ConfigDict, *, steps: int = 20, batch: int = 32,
                eval_batch: int | None = None) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long run, in place: `steps` steps of `batch` (a
  multiple of 8, for 8 fake devices), a log line every 5 steps, two checkpoints,
  evaluation at the end on a 2,048-example slice of the eval split."""
  set_steps(c, batch=batch, eval_batch=eval_batch or None, steps=steps, log_every=5,
            eval_every=steps, checkpoint_every=steps // 2)
  c.dataset.eval_split = "test[:2048]"
  c.optimizer.warmup_steps = 2
  return c


def open_clip_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds init_from (an open_clip / OpenAI ViT CLIP .safetensors file to start from, or
  "") and what such a file may not record (quick_gelu, vision_heads, text_heads; see
  `clip_fields`), in place."""
  c.init_from = ""
  c.quick_gelu = config_dict.placeholder(bool)
  c.vision_heads = config_dict.placeholder(int)
  c.text_heads = config_dict.placeholder(int)
  return c


def clip_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the CLIP task's data, tokenizer and pretrained-weights fields, in place.

  See mmjax/tasks/clip.py for what each does:
    init_from: "" or pretrained weights to start from (mmjax.interop.load_pretrained: an
      open_clip .safetensors file, a Hugging Face CLIPModel or SiglipModel folder).
    quick_gelu: the loaded model's activation (None: from the file's metadata).
    vision_heads, text_heads: its attention heads (None: the file's metadata, else as
      open_clip's configs have them, width / 64; see mmjax/interop/open_clip.py).
    captions: "templates" (class names through prompts) or "data" (the "caption" feature).
    tokenizer: kind "auto" (a Hugging Face init_from folder's own, else "byte"), "byte",
      "pretrained" (the init_from folder's) or "bpe" (vocab: CLIP's
      bpe_simple_vocab_16e6.txt.gz); context_length 0: the model's.
    zeroshot: class_names and templates ("a photo of a {}.") for zero-shot
      classification; empty: mmjax.data.captions's for MNIST and Fashion-MNIST;
      template_set: a set of mmjax.data.templates instead ("openai_imagenet": OpenAI's 80).
    image: size (0: as stored, or the loaded model's), min_crop (smallest training crop,
      a fraction of the shorter side; 1: none), mean/std per channel (empty: the
      dataset's, or the loaded model's with init_from).
  """
  open_clip_fields(c)
  c.captions = "templates"
  c.tokenizer = ml_collections.ConfigDict(dict(kind="auto", vocab="", context_length=0))
  c.zeroshot = ml_collections.ConfigDict(dict(class_names=(), templates=(), template_set=""))
  c.image = ml_collections.ConfigDict(dict(size=0, min_crop=1.0, mean=(), std=()))
  return c


def clip_mnist_model() -> dict:
  """experiments/clip_mnist.py's CLIP (ViT mu/4, a one-layer text tower, width 64): also
  the model of the experiments that start from its runs (LiT, LoRA)."""
  return dict(image_variant="mu/4", image_pool="gap", text_width=64, text_depth=1,
              text_heads=4, text_mlp_dim=256, max_text_len=36, embed_dim=64,
              dropout_rate=0.0, patch_dropout=0.0)
