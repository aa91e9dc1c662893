"""``zstream.hardware()``: what this GPU can do with host memory, read from the CUDA driver; and which device a
``device=`` argument means (``resolve_device``: the one place that decides it).

The attributes come from ``libcuda`` through ctypes (``cuDeviceGetAttribute``): zstream never links CUDA. The link
comes from sysfs (PCIe generation and width) or from the attributes (NVLink-C2C: the GPU uses the host's page
tables, as on the GH200). The host-to-device bandwidth is measured once per process and cached.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Union

from ..errors import UsageError
from .measure import measure_h2d

if TYPE_CHECKING:
    import torch

# CUdevice_attribute values (cuda.h)
ATTR = {
    "pci_bus_id": 33,
    "pci_device_id": 34,
    "pci_domain_id": 50,
    "can_map_host_memory": 19,
    "unified_addressing": 41,
    "pageable_memory_access": 88,
    "concurrent_managed_access": 89,
    "can_use_host_pointer_for_registered_mem": 91,
    "host_register_supported": 99,
    "pageable_memory_access_uses_host_page_tables": 100,
    "direct_managed_mem_access_from_host": 101,
}

# name -> value, or None where the driver does not say
AttrReader = Callable[[str], Optional[int]]


@dataclass
class HardwareReport:
    gpu: Optional[str] = None
    gpu_memory_bytes: int = 0
    link: str = "none"                       # "PCIe gen5 x16", "NVLink-C2C", or "none" (no GPU)
    pcie_gen: Optional[int] = None
    pcie_width: Optional[int] = None
    pageable_memory_access: bool = False     # the GPU can read plain malloc'd memory (HMM or ATS)
    uses_host_page_tables: bool = False      # ... through the CPU's page tables: ATS over NVLink-C2C
    host_pointer_for_registered_mem: bool = False  # a registered host pointer is valid on the device as is
    can_map_host_memory: bool = False
    numa_nodes: List[int] = field(default_factory=list)
    gpu_numa_node: Optional[int] = None      # the host node nearest the GPU (-1/None: unknown or single node)
    page_size: int = 4096
    h2d_gbps: Optional[float] = None         # measured: pinned host-to-device copies

    @property
    def ats(self) -> bool:
        """Weights can stay in pageable host memory and be read by kernels in place."""
        return self.pageable_memory_access and self.uses_host_page_tables

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "ats": self.ats}

    def __str__(self) -> str:
        if self.gpu is None:
            return "no CUDA GPU"
        bw = f"{self.h2d_gbps:.1f} GB/s" if self.h2d_gbps else "not measured"
        return (f"{self.gpu} ({self.gpu_memory_bytes / 2**30:.0f} GiB), link {self.link}, host-to-device {bw}; "
                f"pageable access {'yes' if self.pageable_memory_access else 'no'}"
                f"{' through host page tables (ATS)' if self.uses_host_page_tables else ''}; "
                f"registered host pointers usable on the device: {self.host_pointer_for_registered_mem}; "
                f"NUMA nodes {self.numa_nodes or [0]}, nearest the GPU: {self.gpu_numa_node}; "
                f"page size {self.page_size}")


def driver_attributes(ordinal: int = 0) -> Optional[AttrReader]:  # GPU only: libcuda
    """A reader of CUDA device attributes through libcuda, or None where there is no driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:
        return None
    dev = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
        return None

    def read(name: str) -> Optional[int]:
        value = ctypes.c_int()
        rc = cuda.cuDeviceGetAttribute(ctypes.byref(value), ATTR[name], dev)
        return value.value if rc == 0 else None

    return read


def _sysfs_pci(domain: int, bus: int, device: int) -> Path:
    return Path(f"/sys/bus/pci/devices/{domain:04x}:{bus:02x}:{device:02x}.0")


def _pcie_link(pci: Path) -> tuple[Optional[int], Optional[int]]:
    """(generation, width) from sysfs: "32.0 GT/s PCIe" -> 5."""
    gt_to_gen = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}
    try:
        speed = (pci / "current_link_speed").read_text().split()[0]
        width = int((pci / "current_link_width").read_text().strip())
        return gt_to_gen.get(speed), width
    except (OSError, ValueError, IndexError):
        return None, None


def _numa_nodes() -> List[int]:
    nodes = []
    for p in Path("/sys/devices/system/node").glob("node[0-9]*"):
        try:
            if (p / "cpulist").read_text().strip():  # a node with CPUs (GH200 also lists GPU memory nodes)
                nodes.append(int(p.name[4:]))
        except (OSError, ValueError):
            continue
    return sorted(nodes)


def probe(attrs: Optional[AttrReader], *, name: Optional[str] = None, memory: int = 0,
          sysfs_root: Optional[Callable[[int, int, int], Path]] = None) -> HardwareReport:
    """Build a report from an attribute reader (real or faked in tests)."""
    rep = HardwareReport(page_size=os.sysconf("SC_PAGE_SIZE"), numa_nodes=_numa_nodes())
    if attrs is None:
        return rep
    rep.gpu, rep.gpu_memory_bytes = name or "CUDA GPU", memory
    rep.pageable_memory_access = bool(attrs("pageable_memory_access"))
    rep.uses_host_page_tables = bool(attrs("pageable_memory_access_uses_host_page_tables"))
    rep.host_pointer_for_registered_mem = bool(attrs("can_use_host_pointer_for_registered_mem"))
    rep.can_map_host_memory = bool(attrs("can_map_host_memory"))
    bus, dev, dom = attrs("pci_bus_id"), attrs("pci_device_id"), attrs("pci_domain_id")
    if bus is not None and dev is not None:
        pci = (sysfs_root or _sysfs_pci)(dom or 0, bus, dev)
        rep.pcie_gen, rep.pcie_width = _pcie_link(pci)
        try:
            node = int((pci / "numa_node").read_text().strip())
            rep.gpu_numa_node = node if node >= 0 else None
        except (OSError, ValueError):
            rep.gpu_numa_node = None
    if rep.uses_host_page_tables:
        rep.link = "NVLink-C2C"
    elif rep.pcie_gen:
        rep.link = f"PCIe gen{rep.pcie_gen} x{rep.pcie_width}"
    else:
        rep.link = "PCIe"
    return rep


@functools.cache
def hardware(device: int = 0, measure: bool = True) -> HardwareReport:
    """The report for CUDA device ``device`` (cached; the bandwidth is measured once)."""
    import torch

    if not torch.cuda.is_available():
        return probe(None)
    return _gpu_report(device, measure)


def _gpu_report(device: int, measure: bool) -> HardwareReport:  # GPU only
    import torch

    props = torch.cuda.get_device_properties(device)
    rep = probe(driver_attributes(device), name=props.name, memory=props.total_memory)
    if measure:
        rep.h2d_gbps = measure_h2d(torch.device("cuda", device)).gbps
    return rep


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The device a ``device=`` argument means: None -> the current CUDA device if torch sees one, else the CPU;
    "cuda" -> the current CUDA device, with its index. Refuses what cannot run (no CUDA, not cuda or cpu)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device: cannot read {device!r} as a device: use 'cuda', 'cuda:1' or 'cpu'") from None
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"device: zstream runs on 'cuda' or 'cpu', not {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device={device!r}, but torch sees no CUDA device: use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= torch.cuda.device_count():
            raise UsageError(f"device={device!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev
