"""``offload="auto"``: the one rule that picks where the weights live.

1. everything on the device ("none") when the weights and the KV cache fit the device budget;
2. else, on a GPU that reads host memory through its page tables (ATS over NVLink-C2C, the GH200), in place
   ("ats") -- unless the blocks are quantized, which ats cannot read in place: then "cpu";
3. else pinned host memory ("cpu") when it holds the weights with 10% + 2 GiB to spare (on a CPU device, where host
   memory is the device's own, the weights could only come from disk: "nvme");
4. else the disk ("nvme").

``plan_batch`` asks the same rule which mode blocks stream in (``streaming_offload``: steps 2-4 without ATS, which
the batch planner does not model).
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..errors import QuantizationError
from ..foundations.units import fmt_bytes

OFFLOADS = ("auto", "none", "cpu", "nvme", "ats")
HOST_SLACK_BYTES = 2 << 30  # host memory kept free beyond the weights (and 10% of them) before choosing "cpu"


def host_holds(weights_bytes: int, host_available: int) -> bool:
    """Whether pinned host memory can hold the weights, with room to spare for everything else."""
    return host_available > weights_bytes * 1.1 + HOST_SLACK_BYTES


def streaming_offload(weights_bytes: int, host_available: int, *, device_type: str, ats: bool = False,
                      quantized: bool = False) -> str:
    """The mode blocks stream in when they do not all fit the device (steps 2-4 of the rule)."""
    if ats and not quantized:
        return "ats"
    if device_type == "cuda" and host_holds(weights_bytes, host_available):
        return "cpu"
    return "nvme"


def choose_offload(weights_bytes: int, reserve_bytes: int, device_budget: Optional[int], host_available: int, *,
                   device_type: str, ats: bool = False, quantized: bool = False,
                   quantize_at_load: bool = False, where: str = "") -> Tuple[str, str]:
    """(offload, the note that says why). ``device_budget``: bytes for weights and KV cache on the device (None: no
    limit); ``quantize_at_load``: blocks are quantized into memory while loading, so they cannot come from disk."""
    room = device_budget if device_budget is not None else host_available
    if weights_bytes + reserve_bytes <= room:
        offload = "none"
    else:
        offload = streaming_offload(weights_bytes, host_available, device_type=device_type, ats=ats,
                                    quantized=quantized)
    note = (f"offload='auto' chose {offload!r}: weights {fmt_bytes(weights_bytes)}, KV+activations "
            f"{fmt_bytes(reserve_bytes)}, budget {fmt_bytes(room)}")
    if ats and quantized and offload == "cpu":
        note += "; quantized weights stream by copies, not in place (ats)"
    if offload == "nvme" and quantize_at_load:
        raise QuantizationError(f"{where}: the weights quantized ({fmt_bytes(weights_bytes)}) do not fit host memory "
                                f"({fmt_bytes(host_available)} available), and quantize= quantizes into memory; write "
                                f"a quantized checkpoint with `zstream pack {where} OUT --quantize ...` and load that "
                                "with offload='nvme'")
    return offload, note
