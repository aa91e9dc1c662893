"""Streaming: the engine that runs a model block by block while its weights arrive.

- ``model``: ``StreamingModel`` (the forward pass, generation, tracing, closing);
- ``blocks``: the ``Streamer`` protocol and its resident / dequantized wrappers;
- ``ring``: the device ring (slots, copy stream, events, prefetch, carried across passes);
- ``sources``: where the ring takes bytes from (host arenas, or disk reads ahead);
- ``device``: the device seam (CUDA, or the CPU with a worker thread per stream), so the ring runs in CPU CI;
- ``inplace``: the GH200 mode's streamer (weights read in place, copied for long passes);
- ``trace``: Perfetto traces, by wrapping; ``generate``: the decode loop with transformers' generation pieces;
- ``cache``: the KV cache; ``weights``: block bytes as tensors; ``calibrate``: the compute model, measured;
- ``build``: a model from a plan.
"""
