"""Whole models, one per file."""
from mmjax.models.lenet import LeNet5
from mmjax.models.small_cnn import SmallCNN
