"""The CUDA runtime, reached through what torch has already loaded: zstream never links CUDA.

``install_host_register()`` finds ``cudaHostRegister``/``cudaHostUnregister`` in the ``libcudart`` that torch
mapped into this process and hands their addresses to the Rust core, which then pins each arena once, for its
whole life, and unregisters it before unmapping.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

from .. import _core
from ..errors import warn


def _loaded_cudart() -> str | None:
    """Path of the libcudart that is already mapped into this process, if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libcudart.so" in path and os.path.exists(path):
                    return path
    except OSError:
        return None
    return None


def _bundled_cudart() -> str | None:
    """A libcudart shipped in the nvidia-* wheels next to torch (used when torch links it statically)."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    for pattern in ("nvidia/cu*/lib/libcudart.so*", "nvidia/cuda_runtime/lib/libcudart.so*"):
        found = sorted(glob.glob(os.path.join(site, pattern)))
        if found:
            return found[-1]
    return None


@functools.cache
def install_host_register() -> bool:
    """Give the core CUDA's host-registration entry points. False (and no error) where CUDA is absent."""
    import torch

    if not torch.cuda.is_available():
        return False
    return _install_from_runtime()


def _install_from_runtime() -> bool:  # GPU only: the CUDA runtime's entry points, handed to the core
    import torch

    torch.cuda.init()
    path = _loaded_cudart() or _bundled_cudart()
    if path is None:
        warn("zstream: no CUDA runtime library found in this process; arenas stay unpinned",
             RuntimeWarning)
        return False
    lib = ctypes.CDLL(path)
    register = ctypes.cast(lib.cudaHostRegister, ctypes.c_void_p).value
    unregister = ctypes.cast(lib.cudaHostUnregister, ctypes.c_void_p).value
    if register is None or unregister is None:  # (a symbol resolved to NULL: not a runtime zstream can call)
        warn(f"zstream: {path} gives no cudaHostRegister/cudaHostUnregister; arenas stay unpinned", RuntimeWarning)
        return False
    _core.install_cuda_host_api(register, unregister)
    return _core.cuda_host_api_installed()
