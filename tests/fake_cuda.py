"""A stand-in CUDA runtime for CPU-only tests: ``cudaHostRegister``/``cudaHostUnregister`` as ctypes callbacks whose
outcome the test chooses. Installed once per process (the core keeps the first runtime it is given), and only
stores opened with explicit pin flags call it."""

from __future__ import annotations

import ctypes

import torch

from zstream import _core

# cudaErrorMemoryAllocation: what cudaHostRegister returns under a low RLIMIT_MEMLOCK
MEMORY_ALLOCATION = 2


class FakeRuntime:
    def __init__(self) -> None:
        self.fail = False
        self.registered = 0  # successful registrations
        self.unregistered = 0
        self.flags: list[int] = []  # the flags of each successful registration, in order
        self._register = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)(self._reg)
        self._unregister = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(self._unreg)

    def _reg(self, ptr: int, size: int, flags: int) -> int:
        if self.fail:
            return MEMORY_ALLOCATION
        self.registered += 1
        self.flags.append(flags)
        return 0

    def _unreg(self, ptr: int) -> int:
        self.unregistered += 1
        return 0


_RUNTIME = FakeRuntime()  # module-level: the core holds the callbacks' addresses for the life of the process


def install() -> FakeRuntime:
    """Install the stand-in (skips the calling test where a real runtime is, or could be, installed)."""
    import pytest

    if torch.cuda.is_available():
        pytest.skip("a real CUDA runtime is present")
    if not _core.cuda_host_api_installed():
        _core.install_cuda_host_api(ctypes.cast(_RUNTIME._register, ctypes.c_void_p).value,
                                    ctypes.cast(_RUNTIME._unregister, ctypes.c_void_p).value)
    return _RUNTIME
