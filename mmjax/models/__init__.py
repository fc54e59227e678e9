"""Whole models, one per file."""
from mmjax.models.clip import CLIP
from mmjax.models.lenet import LeNet5
from mmjax.models.small_cnn import SmallCNN
from mmjax.models.text import TextTransformer
from mmjax.models.vit import ViT

__all__ = ["CLIP", "LeNet5", "SmallCNN", "TextTransformer", "ViT"]
