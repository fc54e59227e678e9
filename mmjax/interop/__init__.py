"""Weights in and out of other libraries' checkpoint files (safetensors, read with NumPy).

open_clip: OpenAI / open_clip ViT CLIP <-> mmjax.models.CLIP.
diffusers: diffusers AutoencoderKL (Stable Diffusion's VAE) <-> mmjax.models.AutoencoderKL.

Importing a module here reads no file and imports no other framework.
"""
