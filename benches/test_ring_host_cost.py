"""The ring's host-cost bench on a tiny checkpoint (CPU): both ways run on the same models, and the ring is left as
it was."""

from __future__ import annotations

import json

import torch

from ring_host_cost import main, views_every_copy
from zstream.streaming.ring import DeviceRing


def test_both_ways_time_every_model_and_the_ring_and_threads_are_restored(tmp_path):
    keep, threads = DeviceRing.slot_view, torch.get_num_threads()
    out = main(["--streamed", "0,2", "--rounds", "1", "--json", str(tmp_path / "o.json")])
    assert DeviceRing.slot_view is keep and torch.get_num_threads() == threads
    for way in ("kept", "every copy"):
        assert len(out[way]["step_ms"]) == 2 and all(ms > 0 for ms in out[way]["step_ms"])
    assert json.loads((tmp_path / "o.json").read_text())["streamed"] == [0, 2]


def test_the_old_way_makes_a_slots_views_at_every_copy():
    made = []

    class Ring:
        def __init__(self) -> None:
            self.views = {(0, 3): "kept"}

    def record(self, slot, block, host):
        made.append(dict(self.views))
        return "view"

    keep = DeviceRing.slot_view
    DeviceRing.slot_view = record
    try:
        with views_every_copy():
            assert DeviceRing.slot_view(Ring(), 0, 3, None) == "view"
    finally:
        DeviceRing.slot_view = keep
    assert made == [{}]  # the kept view was dropped before the ring made one
