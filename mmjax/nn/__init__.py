"""Building blocks: convolution, pooling, attention, Transformer layers, fusion."""
