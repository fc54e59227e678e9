"""Building blocks: convolution, pooling, attention, Transformer layers, fusion of modalities."""
from mmjax.nn.attention import MultiHeadAttention, causal_mask, dot_product_attention, padding_mask
from mmjax.nn.conv import Conv2D, conv2d, explicit_padding
from mmjax.nn.fusion import (AdditiveEmbedding, ModalityProjection, PerceiverResampler,
                             SingleStreamEmbedding, additive_fusion, concat_image_text,
                             key_padding_mask)
from mmjax.nn.pool import avg_pool, max_pool
from mmjax.nn.transformer import DecoderBlock, Encoder, EncoderBlock, MlpBlock
from mmjax.nn.window import conv_output_size

__all__ = ["AdditiveEmbedding", "Conv2D", "DecoderBlock", "Encoder", "EncoderBlock", "MlpBlock",
           "ModalityProjection", "MultiHeadAttention", "PerceiverResampler",
           "SingleStreamEmbedding", "additive_fusion", "avg_pool", "causal_mask",
           "concat_image_text", "conv2d", "conv_output_size", "dot_product_attention",
           "explicit_padding", "key_padding_mask", "max_pool", "padding_mask"]
