"""End-to-end generation pipelines built from loaded pretrained parts.

stable_diffusion: text-to-image with a diffusers Stable Diffusion 1.x/2.x folder.

Importing a module here reads no file.
"""
