"""The CUDA backend on a real GPU (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch

from batchprobe.probe import run_probe
from batchprobe.search import Outcome
from batchprobe.units import MemorySize

pytestmark = pytest.mark.cuda


def _gpu_session():
    from batchprobe.session import open_session
    from batchprobe.spec import load_spec

    text = "model: {source: zoo:gpt}\nprobe: {device: cuda, memory_budget: 1GiB}\n"
    return open_session(load_spec(text=text))


def test_budget_caps_the_allocator_and_the_boundary_is_exact() -> None:
    s = _gpu_session()
    result = s.search(strategy="doubling")
    assert result.search.exact
    best = result.max_batch_size
    assert run_probe(s.step, s.backend, best).outcome is Outcome.FIT
    assert run_probe(s.step, s.backend, best + 1).outcome is Outcome.OOM
    assert result.peak_bytes <= 1024**3


def test_phase_peaks_and_reserved_memory_are_reported() -> None:
    s = _gpu_session()
    r = run_probe(s.step, s.backend, 2)
    assert r.outcome is Outcome.FIT
    assert r.reserved_bytes is not None and r.reserved_bytes >= r.peak_bytes
    assert r.line_bytes is not None and 0 < r.line_bytes <= r.peak_bytes


def test_memory_is_released_after_ooms() -> None:
    s = _gpu_session()
    before = torch.cuda.memory_allocated()
    result = s.search(strategy="doubling")
    assert any(p.outcome is Outcome.OOM for p in result.probes)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert all(p.retained_bytes == 0 for p in result.probes)


def test_event_timers_measure_device_time() -> None:
    s = _gpu_session()
    s.backend.set_budget(MemorySize(fraction=0.9))
    start = s.backend.mark()
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(10):
        a = a @ a
    end = s.backend.mark()
    assert s.backend.elapsed_s(start, end) > 0
