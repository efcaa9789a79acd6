"""GGUF weights kept quantized: formats.py and sixteen.py repack each type into the int4 kernel's operands,
linear.py multiplies by them (QuantizedLinear) and reads rows out of them (embeddings)."""
from reprise.models.layers.quant.formats import GROUP, NATIVE_TYPES, GGMLTensor, Packing
from reprise.models.layers.quant.linear import (DENSE_FROM_ROWS, QuantizedEmbedding, QuantizedLinear, SharedEmbedding,
                                                StackedLinear, can_pack, pack, rows_readable, weights_bytes)

__all__ = ["DENSE_FROM_ROWS", "GROUP", "NATIVE_TYPES", "GGMLTensor", "Packing", "QuantizedEmbedding",
           "QuantizedLinear", "SharedEmbedding", "StackedLinear", "can_pack", "pack", "rows_readable", "weights_bytes"]
