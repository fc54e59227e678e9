"""Weights in and out of other libraries' checkpoint files (safetensors, read with NumPy).

open_clip: OpenAI / open_clip ViT CLIP <-> mmjax.models.CLIP.
hf_clip: Hugging Face transformers CLIPModel and SiglipModel folders <-> mmjax.models.CLIP
  (hf_tokenizer: their tokenizers).
pretrained: `load_pretrained(path)`, any of these CLIP layouts, saying which it found.
diffusers: diffusers AutoencoderKL (Stable Diffusion's VAE) <-> mmjax.models.AutoencoderKL.

Importing a module here reads no file and imports no other framework.
"""


def load_pretrained(path, **kwargs):
  """mmjax.interop.pretrained.load_pretrained: any supported CLIP / SigLIP layout at `path`."""
  from mmjax.interop import pretrained  # pylint: disable=import-outside-toplevel
  return pretrained.load_pretrained(path, **kwargs)
