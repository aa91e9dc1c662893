"""Lossless coding of 16-bit weights: the exponent bits entropy-coded, every output bit as in the checkpoint.

- ``codec``: one tensor's code (``encode`` through the native module, ``decode_host``), the format and metadata;
- ``kernels``: the GPU decoder (Triton), bit-identical to the native one;
- ``blocks``: whole blocks (``BlockCode``: code at load, decode in the slot), standing where ``quant.BlockQuant``
  stands.
"""

from .blocks import BlockCode, LosslessConfig, block_code_for, coded_infos, packed_code
from .codec import (
                    CODED_DTYPES,
                    METADATA_KEY,
                    OFFSETS,
                    RAW,
                    SUFFIXES,
                    TABLE,
                    WORDS,
                    CodedTensor,
                    decode_host,
                    encode,
                    from_metadata,
                    to_metadata,
)
from .kernels import decode

__all__ = [
                    "CODED_DTYPES",
                    "METADATA_KEY",
                    "OFFSETS",
                    "RAW",
                    "SUFFIXES",
                    "TABLE",
                    "WORDS",
                    "BlockCode",
                    "CodedTensor",
                    "LosslessConfig",
                    "block_code_for",
                    "coded_infos",
                    "decode",
                    "decode_host",
                    "encode",
                    "from_metadata",
                    "packed_code",
                    "to_metadata",
]
