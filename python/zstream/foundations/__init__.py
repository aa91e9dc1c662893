"""The bottom layer: what everything above builds on, importing nothing above it.

- ``store``: the Rust weight store (``zstream._core``): safetensors indexed in place, read into pinned arenas,
  handed to torch through DLPack; ``cuda``: the CUDA runtime torch loaded, for pinning;
- ``models``: the families' math (BLOOM, OPT, LLaMA/Mistral/Qwen2), pure functions over weight dicts;
- ``quant``: the int4/int8 scheme, its Triton kernel, quantized blocks;
- ``lossless``: the lossless code (Huffman-coded exponents), its kernel, coded blocks; ``coded``: what a block's
  coded form shares, packed or coded;
- ``checkpoint``: where a checkpoint comes from (directory, hub), its config and tokenizer;
- ``writer``: writing safetensors checkpoints (new directories, renamed into place when complete);
- ``hardware``, ``measure``: what the GPU can do, the device an argument means, and the bandwidths that bound
  streaming;
- ``units``: byte sizes and dtypes.
"""
