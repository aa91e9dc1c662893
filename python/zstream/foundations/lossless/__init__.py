"""Lossless coding of 16-bit weights: the exponent bits entropy-coded, every output bit as in the checkpoint.

- ``codec``: one tensor's code (``encode`` through the native module, ``decode_host``), the format and metadata;
- ``kernels``: the GPU decoder (Triton), bit-identical to the native one.
"""

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

__all__ = ["CODED_DTYPES", "METADATA_KEY", "OFFSETS", "RAW", "SUFFIXES", "TABLE", "WORDS", "CodedTensor", "decode",
           "decode_host", "encode", "from_metadata", "to_metadata"]
