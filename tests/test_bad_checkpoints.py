"""Every malformed checkpoint gives a CheckpointError naming the file and the fault — never a crash."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import zstream
from zstream.errors import CheckpointError, ReadError, ZStreamError

from conftest import write_raw_safetensors

GOOD = {"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "data", "header_len", "fault"),
    [
        (GOOD, bytes(4), None, "run past the"),                                      # data cut short
        (GOOD, bytes(8), 10**6, "past the end"),                                     # header length beyond file
        (GOOD, bytes(8), 2**40, "cap"),                                              # absurd header length
        ({"w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [4, 12]}}, bytes(8), None, "run past"),
        ({"a": {"dtype": "U8", "shape": [6], "data_offsets": [0, 6]},
          "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, bytes(8), None, "overlap"),
        ({"w": {"dtype": "F16", "shape": [3, 2], "data_offsets": [0, 8]}}, bytes(8), None, "x shape"),
        ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, bytes(8), None, "unknown dtype"),
        ({"w": {"dtype": "F16", "shape": [2]}}, bytes(8), None, "malformed entry"),
        ({"w": {"dtype": "U8", "shape": [2], "data_offsets": [2, 0]}}, bytes(8), None, "reversed"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ],
)
def test_bad_headers(tmp_ckpt, header, data, header_len, fault):
    f = write_raw_safetensors(tmp_ckpt / "bad.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=fault) as e:
        zstream.WeightStore.open(f)
    assert "bad.safetensors" in str(e.value)


def test_invalid_json(tmp_ckpt):
    f = tmp_ckpt / "j.safetensors"
    f.write_bytes(struct.pack("<Q", 5) + b"{nope" + bytes(8))
    with pytest.raises(CheckpointError, match=r"j\.safetensors.*not valid JSON"):
        zstream.WeightStore.open(f)


def test_too_short_file(tmp_ckpt):
    f = tmp_ckpt / "s.safetensors"
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        zstream.WeightStore.open(f)


def test_truncated_download(tmp_ckpt):
    save_file({"w": torch.randn(1000)}, tmp_ckpt / "t.safetensors")
    raw = (tmp_ckpt / "t.safetensors").read_bytes()
    (tmp_ckpt / "t.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match=r"t\.safetensors.*run past"):
        zstream.WeightStore.open(tmp_ckpt)


def _two_shards(d):
    save_file({"a": torch.randn(3)}, d / "model-00001-of-00002.safetensors")
    save_file({"b": torch.randn(3)}, d / "model-00002-of-00002.safetensors")


def test_index_names_missing_shard(tmp_ckpt):
    _two_shards(tmp_ckpt)
    wm = {"a": "model-00001-of-00002.safetensors", "c": "model-00003-of-00003.safetensors"}
    (tmp_ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003\.safetensors, which is missing"):
        zstream.WeightStore.open(tmp_ckpt)


def test_index_names_wrong_tensor(tmp_ckpt):
    _two_shards(tmp_ckpt)
    wm = {"a": "model-00001-of-00002.safetensors", "zz": "model-00002-of-00002.safetensors"}
    (tmp_ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match=r"index maps tensor \"zz\""):
        zstream.WeightStore.open(tmp_ckpt)


def test_index_is_not_json(tmp_ckpt):
    _two_shards(tmp_ckpt)
    (tmp_ckpt / "model.safetensors.index.json").write_text("{weight_map: oops")
    with pytest.raises(CheckpointError, match="index is not valid"):
        zstream.WeightStore.open(tmp_ckpt)


def test_duplicate_names_across_shards(tmp_ckpt):
    save_file({"a": torch.randn(3)}, tmp_ckpt / "x.safetensors")
    save_file({"a": torch.randn(3)}, tmp_ckpt / "y.safetensors")
    with pytest.raises(CheckpointError, match=r"y\.safetensors.*\"a\" is also in .*x\.safetensors"):
        zstream.WeightStore.open(tmp_ckpt)


def test_directory_without_safetensors(tmp_ckpt):
    (tmp_ckpt / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no \.safetensors files"):
        zstream.WeightStore.open(tmp_ckpt)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="cannot open checkpoint"):
        zstream.WeightStore.open(tmp_path / "absent")


@pytest.mark.parametrize("reader", ["uring", "pread", "mmap"])
def test_file_truncated_after_open(tmp_ckpt, reader):
    save_file({"a": torch.randn(100_000), "b": torch.randn(100_000)}, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt)
    last = max(store.names(), key=lambda n: store.info(n).offset)
    os.truncate(tmp_ckpt / "m.safetensors", store.info(last).offset + 10)
    with pytest.raises(ReadError, match=r"m\.safetensors: file ends at byte") as e:
        store.read([last], reader=reader)
    assert e.value.filename.endswith("m.safetensors")
    assert isinstance(e.value, ZStreamError)

