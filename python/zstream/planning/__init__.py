"""Planning: pure functions of (a checkpoint's facts, the machine's resources, the options). No device work here:
what is measured (the link, the compute) is measured elsewhere and handed in, so every decision can be tested
with made-up hardware.

- ``facts``: a checkpoint's sizes, dtypes and quantization, from its headers;
- ``offload``: the ``offload="auto"`` rule;
- ``residency``: the load ``Plan`` (resident and streamed blocks, the ring, the reserve) and ``plan_load``;
- ``batch``: the batch planner (a compute model, the ring's schedule, the best batch and residency for a budget).
"""
