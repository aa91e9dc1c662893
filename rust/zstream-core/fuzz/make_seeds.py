"""Write the seed corpora: a few valid safetensors files for `header`, valid indexes for `index`,
and a handful of plans for `planner`. Run from rust/zstream-core/fuzz: python3 make_seeds.py"""

import json
import os
import struct

import numpy as np
from safetensors.numpy import save


def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# header: whole files written by the reference implementation.
write("header", "one-f32", save({"w": np.arange(4, dtype=np.float32).reshape(2, 2)}))
write(
    "header",
    "mixed",
    save(
        {
            "a": np.zeros((3,), np.float16),
            "b": np.ones((2, 3), np.int64),
            "c": np.array([True, False]),
            "d": np.zeros((0, 4), np.uint8),
            "e": np.zeros((), np.float64),
        },
        metadata={"format": "pt", "note": "seed"},
    ),
)
write("header", "empty", save({}))
# Hand-written: BF16 and F8 (numpy has neither), and an 8-byte-padded header as the spec allows.
hdr = json.dumps(
    {
        "x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
        "y": {"dtype": "F8_E4M3", "shape": [1, 3], "data_offsets": [4, 7]},
        "z": {"dtype": "U8", "shape": [0], "data_offsets": [7, 7]},
    }
).encode()
hdr += b" " * (-len(hdr) % 8)
write("header", "bf16-f8", struct.pack("<Q", len(hdr)) + hdr + bytes(7))

# index: the weight map of the shards the target writes, plus variants.
s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
full = {"a.weight": s1, "a.bias": s1, "empty": s1, "b.weight": s2}
write("index", "full", json.dumps({"metadata": {"total_size": 26}, "weight_map": full}).encode())
write("index", "partial", json.dumps({"weight_map": {"a.weight": s1}}).encode())
write("index", "wrong-shard", json.dumps({"weight_map": {"a.weight": s2, "b.weight": s2}}).encode())

# planner: raw bytes for the arbitrary-derived input (any bytes decode; these just start with a few wants).
write("planner", "few", bytes([1, 0, 0, 0, 0, 0, 0, 0, 0, 5, 3]) + bytes(range(1, 200)))
write("planner", "zeros", bytes(64))
