"""The CUDA backend, on a real GPU where there is one and always on the simulated GPU: the same
tests, the same code path (`batchprobe.backends.cuda` through its driver)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from batchprobe.backends.simcuda import simulated_cuda
from batchprobe.probe import run_probe
from batchprobe.search import Outcome
from batchprobe.session import Session, open_session
from batchprobe.spec import load_spec
from batchprobe.units import MemorySize

SPEC = "model: {source: zoo:gpt, kwargs: {n_layer: 2, n_embd: 128, vocab_size: 1024}}\nprobe: {device: cuda, memory_budget: 512MiB}\n"


@pytest.fixture(params=["simulated", pytest.param("real", marks=pytest.mark.cuda)])
def gpu(request: pytest.FixtureRequest) -> Iterator[Session]:
    if request.param == "real":
        yield open_session(load_spec(text=SPEC))
        return
    with simulated_cuda(total_bytes=8 * 1024**3):
        yield open_session(load_spec(text=SPEC))


def _allocated(s: Session) -> int:
    drv = s.device.driver  # type: ignore[attr-defined]
    s.device.synchronize()
    return int(drv.memory_allocated(s.device.index))  # type: ignore[attr-defined]


def test_budget_caps_the_allocator_and_the_boundary_is_exact(gpu: Session) -> None:
    result = gpu.search(strategy="doubling")
    assert result.search.exact
    best = result.max_batch_size
    assert best is not None
    assert run_probe(gpu.step, gpu.device, best).outcome is Outcome.FIT
    assert run_probe(gpu.step, gpu.device, best + 1).outcome is Outcome.OOM
    assert result.peak_bytes is not None and result.peak_bytes <= 512 * 1024**2


def test_phase_peaks_and_reserved_memory_are_reported(gpu: Session) -> None:
    r = run_probe(gpu.step, gpu.device, 2)
    assert r.outcome is Outcome.FIT and r.peak_bytes is not None
    assert r.reserved_bytes is not None and r.reserved_bytes >= r.peak_bytes
    assert r.line_bytes is not None and 0 < r.line_bytes <= r.peak_bytes


def test_memory_is_released_after_ooms(gpu: Session) -> None:
    # as the first test of a fresh process: the warm-up has made what a process keeps (cuBLAS
    # workspaces, one per thread), so nothing the search leaves counts as retained
    before = _allocated(gpu)
    result = gpu.search(strategy="doubling")
    assert any(p.outcome is Outcome.OOM for p in result.probes)
    assert _allocated(gpu) == before
    assert all(p.retained_bytes == 0 for p in result.probes)
    assert not any(p.isolated for p in result.probes) and not result.warnings


def test_event_timers_measure_device_time(gpu: Session) -> None:
    gpu.device.set_budget(MemorySize(fraction=0.9))
    start = gpu.device.mark()
    a = torch.randn(512, 512, device=gpu.device.device)
    for _ in range(10):
        a = a @ a
    end = gpu.device.mark()
    assert gpu.device.elapsed_s(start, end) > 0
