"""Building blocks: convolution, pooling, attention, Transformer layers."""
from mmjax.nn.attention import MultiHeadAttention, causal_mask, dot_product_attention, padding_mask
from mmjax.nn.conv import Conv2D, conv2d, conv_output_size, explicit_padding
from mmjax.nn.pool import avg_pool, max_pool
from mmjax.nn.transformer import DecoderBlock, Encoder, EncoderBlock, MlpBlock

__all__ = ["Conv2D", "DecoderBlock", "Encoder", "EncoderBlock", "MlpBlock", "MultiHeadAttention",
           "avg_pool", "causal_mask", "conv2d", "conv_output_size", "dot_product_attention",
           "explicit_padding", "max_pool", "padding_mask"]
from mmjax.nn.fusion import (AdditiveEmbedding, ModalityProjection, PerceiverResampler,
                             SingleStreamEmbedding, additive_fusion, concat_image_text,
                             key_padding_mask)

__all__ += ["AdditiveEmbedding", "ModalityProjection", "PerceiverResampler",
            "SingleStreamEmbedding", "additive_fusion", "concat_image_text", "key_padding_mask"]
