"""Group-wise int4/int8 quantization of the blocks' linear weights.

- ``scheme``: the numbers (``quantize``, ``dequantize`` in torch, ``QuantConfig``, the packed layout);
- ``kernels``: the Triton dequantization kernel, bit-identical to ``scheme.dequantize``;
- ``blocks``: whole blocks (``BlockQuant``: pack at load, dequantize in the slot) and ``checkpoint_quant``, which
  decides how a checkpoint's blocks are quantized.
"""

from .blocks import BlockQuant, block_quant_for, checkpoint_quant, packed_config, tensor_infos
from .scheme import CODES, METADATA_KEY, SCALE, ZERO, QuantConfig, QuantizedTensor, dequantize, quantize

__all__ = ["CODES", "METADATA_KEY", "SCALE", "ZERO", "BlockQuant", "QuantConfig", "QuantizedTensor",
           "block_quant_for", "checkpoint_quant", "dequantize", "packed_config", "quantize",
           "tensor_infos"]
