"""Whole models, one per file."""
from mmjax.models.autoencoder import AutoencoderKL
from mmjax.models.clip import CLIP
from mmjax.models.imagebert import ImageBERT
from mmjax.models.lenet import LeNet5
from mmjax.models.small_cnn import SmallCNN
from mmjax.models.text import TextTransformer
from mmjax.models.unet import UNet
from mmjax.models.vit import ViT
from mmjax.models.vlm import VisionLanguageModel, greedy_generate

__all__ = ["AutoencoderKL", "CLIP", "ImageBERT", "LeNet5", "SmallCNN", "TextTransformer", "UNet",
           "ViT", "VisionLanguageModel", "greedy_generate"]
