"""Building blocks: convolution, pooling, attention, Transformer layers, fusion."""
from mmjax.nn.conv import Conv2D, conv2d, conv_output_size, explicit_padding
from mmjax.nn.pool import avg_pool, max_pool
