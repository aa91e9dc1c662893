"""Detection and mode choice with faked device attributes; the CUDA-device DLPack export checked on the CPU."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from safetensors.torch import save_file

import zstream
from zstream import _core
from zstream.foundations.hardware import HardwareReport, probe
from zstream.planning.offload import choose_offload

GH200 = {"pageable_memory_access": 1, "pageable_memory_access_uses_host_page_tables": 1,
         "can_use_host_pointer_for_registered_mem": 1, "can_map_host_memory": 1, "pci_bus_id": 1,
         "pci_device_id": 0, "pci_domain_id": 9}
H100_PCIE = {**GH200, "pageable_memory_access": 0, "pageable_memory_access_uses_host_page_tables": 0,
             "pci_bus_id": 0x1b}
HMM_ONLY = {**H100_PCIE, "pageable_memory_access": 1}  # HMM: pageable access, but not through host page tables


def fake(attrs):
    return lambda name: attrs.get(name)


def sysfs(tmp_path, speed="32.0 GT/s PCIe", width="16", node="1"):
    def root(domain, bus, device):
        d = tmp_path / f"{domain:04x}:{bus:02x}:{device:02x}.0"
        d.mkdir(exist_ok=True)
        (d / "current_link_speed").write_text(speed + "\n")
        (d / "current_link_width").write_text(width + "\n")
        (d / "numa_node").write_text(node + "\n")
        return d
    return root


def test_gh200_is_ats_over_c2c(tmp_path):
    rep = probe(fake(GH200), name="NVIDIA GH200 480GB", memory=96 << 30, sysfs_root=sysfs(tmp_path))
    assert rep.ats and rep.link == "NVLink-C2C"
    assert rep.gpu_numa_node == 1
    assert "ATS" in str(rep)
    assert choose_offload(350 << 30, 0, 90 << 30, 400 << 30, device_type="cuda", ats=rep.ats)[0] == "ats"


def test_pcie_h100_has_no_ats(tmp_path):
    rep = probe(fake(H100_PCIE), name="NVIDIA H100 80GB HBM3", memory=80 << 30, sysfs_root=sysfs(tmp_path))
    assert not rep.ats
    assert rep.link == "PCIe gen5 x16" and (rep.pcie_gen, rep.pcie_width) == (5, 16)
    assert rep.host_pointer_for_registered_mem
    assert choose_offload(14 << 30, 0, 78 << 30, 100 << 30, device_type="cuda", ats=rep.ats)[0] == "none"
    assert choose_offload(140 << 30, 0, 78 << 30, 200 << 30, device_type="cuda", ats=rep.ats)[0] == "cpu"
    assert choose_offload(350 << 30, 0, 78 << 30, 100 << 30, device_type="cuda", ats=rep.ats)[0] == "nvme"


def test_hmm_without_host_page_tables_is_not_ats(tmp_path):
    rep = probe(fake(HMM_ONLY), name="x", memory=1, sysfs_root=sysfs(tmp_path, node="-1"))
    assert rep.pageable_memory_access and not rep.ats
    assert rep.gpu_numa_node is None


def test_no_gpu_report():
    rep = probe(None)
    assert rep.gpu is None and rep.link == "none" and not rep.ats
    assert rep.page_size > 0  # read from the system, not assumed to be 4 KiB
    assert str(rep) == "no CUDA GPU"
    assert HardwareReport().to_dict()["ats"] is False


def test_hardware_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert zstream.hardware().gpu is None


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.c_void_p),
                ("byte_offset", ctypes.c_uint64)]


def _dltensor(capsule) -> _DLTensor:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return _DLTensor.from_address(get(capsule, b"dltensor"))


def test_arena_exports_as_a_cuda_tensor_over_host_memory(tmp_ckpt):
    """What the ats mode hands torch: a kDLCUDA capsule whose pointer is the host arena, 256-byte aligned."""
    ref = torch.randn(4096, dtype=torch.float16)
    save_file({"a": torch.zeros(3, dtype=torch.uint8), "w": ref}, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt, pin=False, tensor_align=256)
    dev_cap, offsets, err, host_cap = store._core.read_flat(["w"], device_type=_core.KDL_CUDA, device_id=0,
                                                            host_too=True)
    t = _dltensor(dev_cap)
    assert (t.device.device_type, t.device.device_id) == (_core.KDL_CUDA, 0)
    assert t.byte_offset == 0  # torch refuses a non-zero byte_offset
    host = torch.from_dlpack(host_cap)  # the same arena as a CPU tensor
    assert t.data == host.data_ptr()
    assert (t.data + offsets[0]) % 256 == 0  # shifted so kernels reading in place get aligned operands
    assert torch.equal(host[offsets[0]:offsets[0] + ref.numel() * 2].view(torch.float16), ref)
    assert err is None


def test_the_cuda_runtime_is_found_where_torch_keeps_it():
    """Where pinning gets cudaHostRegister from: the libcudart mapped into this process, else the one in the
    nvidia-* wheels beside torch. Each answer is None or a libcudart that exists (a CPU-only torch has neither)."""
    from zstream.foundations.cuda import _bundled_cudart, _loaded_cudart

    for found in (_loaded_cudart(), _bundled_cudart()):
        assert found is None or ("libcudart.so" in found and os.path.exists(found))
    if torch.version.cuda and not torch.cuda.is_available():  # a CUDA build of torch from PyPI, on a CPU machine
        assert _bundled_cudart() is not None
