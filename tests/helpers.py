"""Shared helpers for tests that run real probes."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

from batchprobe.probe import run_probe
from batchprobe.session import Session, open_session
from batchprobe.spec import load_spec
from batchprobe.units import MemorySize


def session(source: str, budget: int | str = "256MiB", **sections: Any) -> Session:
    """A CPU session for `source` with a memory budget; extra spec sections as dicts."""
    import json

    data: dict[str, Any] = {"model": {"source": source}, "probe": {"device": "cpu"}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    data["probe"]["memory_budget"] = budget
    s = open_session(load_spec(text=json.dumps(data)))
    gc.collect()
    gc.freeze()  # as the CLI does: keeps the collections after failed probes cheap
    return s


def peak_at(s: Session, batch_size: int) -> int:
    """Measured peak at one size with an ample budget."""
    saved = s.backend.budget_bytes
    s.backend.set_budget(MemorySize(bytes=64 * 1024**3))
    try:
        result = run_probe(s.step, s.backend, batch_size)
    finally:
        s.backend.budget_bytes = saved
    assert result.peak_bytes is not None
    return result.peak_bytes


def budget_for(s: Session, boundary: int) -> int:
    """A budget whose exact boundary is `boundary` (between the peaks at b and b+1)."""
    lo, hi = peak_at(s, boundary), peak_at(s, boundary + 1)
    assert hi > lo, "peak must grow with batch size here"
    return (lo + hi) // 2


@contextlib.contextmanager
def crowded_cpu(hogs: int = 2) -> Iterator[Callable[[], None]]:
    """One CPU of this machine held by `hogs` busy processes; yields what a child process calls
    (as `preexec_fn`) to run on that CPU too. The hogs are stopped on leaving."""
    import pytest

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs Linux's CPU affinity")
    cpu = min(os.sched_getaffinity(0))

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin)
        for _ in range(hogs)
    ]
    try:
        yield pin
    finally:
        for p in procs:
            p.kill()
            p.wait()
