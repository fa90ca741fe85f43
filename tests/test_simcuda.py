"""The simulated CUDA device behaves as PyTorch's CUDA device does where batchprobe depends on it:
allocator rounding and segments, the reserved-memory cap, OOM texts, library workspaces and
errors, sticky errors, other processes. Each figure below follows c10's caching allocator."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from batchprobe.backends.simcuda import simulated_cuda
from batchprobe.backends.simcuda.allocator import (
    CachingAllocator,
    SegmentRefused,
    allocation_size,
    format_size,
    round_size,
)
from batchprobe.probe import classify

MiB = 1024**2


# ----------------------------------------------------------------------------- the allocator


def test_rounding_and_segment_sizes_follow_the_caching_allocator() -> None:
    assert [round_size(n) for n in (1, 512, 513, 1000)] == [512, 512, 1024, 1024]
    assert allocation_size(512) == 2 * MiB  # small pool: 2 MiB segments
    assert allocation_size(MiB) == 2 * MiB
    assert allocation_size(MiB + 512) == 20 * MiB  # 1-10 MiB: 20 MiB segments
    assert allocation_size(10 * MiB) == 10 * MiB  # from 10 MiB: its own, rounded to 2 MiB
    assert allocation_size(11 * MiB) == 12 * MiB
    assert [format_size(n) for n in (512, 1024, 1025, MiB, 20 * MiB, 80 * 1024**3)] == [
        "512 bytes", "1024 bytes", "1.00 KiB", "1024.00 KiB", "20.00 MiB", "80.00 GiB",
    ]  # fmt: skip


def test_a_peak_of_allocated_bytes_under_the_cap_can_still_fail() -> None:
    # 1.5 MiB blocks come from 20 MiB segments; the cap is on reserved memory
    a = CachingAllocator(room=lambda: 10**12, cap_bytes=30 * MiB)
    # twelve fill 18 MiB of one segment; the 13th takes the last 2 MiB whole (splitting would
    # leave no more than 1 MiB)
    blocks = [a.malloc(3 * MiB // 2) for _ in range(13)]
    with pytest.raises(SegmentRefused) as refused:
        a.malloc(3 * MiB // 2)  # a second 20 MiB segment would reserve 40 MiB > 30 MiB
    assert a.allocated == 20 * MiB < 30 * MiB
    assert refused.value.alloc_size == 20 * MiB
    assert a.num_alloc_retries == 1 and a.num_ooms == 1
    for b in blocks:
        a.free(b)
    assert a.allocated == 0 and a.reserved == 20 * MiB  # cached, not returned
    assert a.release_cached() == 20 * MiB and a.reserved == 0


def test_large_blocks_split_only_when_more_than_1_mib_remains() -> None:
    a = CachingAllocator(room=lambda: 10**12)
    first = a.malloc(19 * MiB + 512)  # 20 MiB segment, 512 KiB would remain: handed out whole
    assert first.size == 20 * MiB and a.allocated == 20 * MiB
    a.free(first)
    small = a.malloc(2 * MiB)  # the free 20 MiB block is split: 18 MiB remain
    assert small.size == 2 * MiB and a.reserved == 20 * MiB


def test_partly_used_segments_are_never_released() -> None:
    a = CachingAllocator(room=lambda: 10**12)
    keep = a.malloc(4 * MiB)
    gone = a.malloc(4 * MiB)
    a.free(gone)
    assert a.release_cached() == 0  # the segment still holds `keep`
    a.free(keep)
    assert a.release_cached() == 20 * MiB


# ----------------------------------------------------------------------------- the device


def test_oom_text_type_and_statistics_are_pytorchs() -> None:
    with simulated_cuda(total_bytes=1024 * MiB, context_bytes=100 * MiB) as sim:
        sim.set_memory_fraction(0.25, 0)
        with pytest.raises(torch.OutOfMemoryError) as raised:
            torch.empty(300 * MiB, dtype=torch.uint8)
        text = str(raised.value)
        assert re.match(
            r"CUDA out of memory\. Tried to allocate 300\.00 MiB\. GPU 0 has a total capacity of "
            r"1024\.00 MiB of which \d+\.\d\d MiB is free\. Including non-PyTorch memory, this "
            r"process has \d+\.\d\d MiB memory in use\. 256\.00 MiB allowed; Of the allocated "
            r"memory \S+ \S+ is allocated by PyTorch, and \S+ \S+ is reserved by PyTorch but "
            r"unallocated\. If reserved but unallocated memory is large try setting",
            text,
        ), text
        assert classify(raised.value).kind == "allocator"
        stats = sim.memory_stats(0)
        assert stats["num_ooms"] == 1 and stats["num_alloc_retries"] == 1


def test_cublas_keeps_a_workspace_per_thread_for_the_life_of_the_process() -> None:
    with simulated_cuda(capability=(9, 0)) as sim:
        model = nn.Linear(64, 64)
        before = sim.memory_allocated(0)
        for _ in range(2):
            model(torch.randn(8, 64)).sum().backward()
        held = sim.memory_allocated(0) - before
        grads = sum(round_size(p.numel() * 4) for p in model.parameters())
        # forward and autograd each got one 32 MiB workspace (sm90); the second step none
        assert held - grads == 2 * 32 * MiB
    with simulated_cuda(capability=(8, 0)) as sim:
        before = sim.memory_allocated(0)
        nn.Linear(64, 64)(torch.randn(8, 64))
        assert sim.memory_allocated(0) - before >= 8_519_680  # ':4096:2:16:8' before Hopper


def test_cudnn_benchmark_picks_a_workspace_that_grows_with_free_memory() -> None:
    # the fastest algorithms want a few times the input (here 24 MiB); autotuning takes the
    # fastest that fits the memory free at that moment
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(8, 3, 256, 256)  # 6 MiB
    peaks = []
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for total in (48 * MiB, 480 * MiB):
            with simulated_cuda(total_bytes=total, context_bytes=0) as sim:
                sim.reset_peak_memory_stats(0)
                conv(x)
                peaks.append(sim.max_memory_allocated(0))
    finally:
        torch.backends.cudnn.benchmark = saved
    assert peaks[1] > peaks[0] > 0


@pytest.mark.parametrize("kind", ["illegal-address", "assert", "launch-failure"])
def test_sticky_errors_poison_every_later_call(kind: str) -> None:
    with simulated_cuda() as sim:
        x = torch.ones(4)
        error = sim.fault(kind)
        assert isinstance(error, RuntimeError)
        if hasattr(torch, "AcceleratorError"):
            assert isinstance(error, torch.AcceleratorError) and error.error_code in (700, 710, 719)
        assert classify(error).kind == "sticky"
        for call in (
            lambda: sim.synchronize(0),
            lambda: sim.empty_cache(),
            lambda: sim.mem_get_info(0),
            lambda: sim.memory_stats(0),
            lambda: x + 1,  # any launch
        ):
            with pytest.raises(RuntimeError, match=str(error).splitlines()[0]):
                call()


def test_other_processes_take_memory_between_calls(tmp_path) -> None:
    with simulated_cuda(total_bytes=4096 * MiB, context_bytes=0, state_dir=str(tmp_path)) as sim:
        free_before, total = sim.mem_get_info(0)
        sim.occupy(1024 * MiB, owner="tenant")
        free_after, _ = sim.mem_get_info(0)
        assert free_before - free_after == 1024 * MiB and total == 4096 * MiB
        with pytest.raises(
            torch.OutOfMemoryError, match=r"Process tenant has 1024\.00 MiB memory in use"
        ):
            torch.empty(3500 * MiB, dtype=torch.uint8)


LIBRARY_CASES = {
    # the library, what to run, the simulator's settings, the text, the classification
    "cublas-create": (
        lambda: nn.Linear(8, 8)(torch.randn(2, 8)),
        {"total_bytes": 600 * MiB, "context_bytes": 597 * MiB},
        "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
        "cublas",
    ),
    "cublas-call": (
        lambda: nn.Linear(8, 8)(torch.randn(2, 8)),
        {"library_scratch": {"cublas": 10**13}},
        "CUBLAS_STATUS_ALLOC_FAILED",
        "cublas",
    ),
    "cudnn-v9": (
        lambda: nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)),
        {"library_scratch": {"cudnn": 10**13}},
        "was unable to find an engine to execute this computation",
        "cudnn",
    ),
    "cudnn-v8": (
        lambda: nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)),
        {"library_scratch": {"cudnn": 10**13}, "library_errors": {"cudnn": "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"}},
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
        "cudnn",
    ),
    "cudnn-alloc": (
        lambda: nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)),
        {"library_scratch": {"cudnn": 10**13}, "library_errors": {"cudnn": "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"}},
        "CUDNN_STATUS_ALLOC_FAILED",
        "cudnn",
    ),
    "cufft": (
        lambda: torch.fft.rfft(torch.randn(4, 16)),
        {"library_scratch": {"cufft": 10**13}},
        "cuFFT error: CUFFT_ALLOC_FAILED",
        "cufft",
    ),
    "raw": (
        lambda: torch.randn(100).topk(3),
        {"library_scratch": {"raw": 10**13}, "raw_scratch_ops": ("aten.topk",)},
        "CUDA error: out of memory",
        "cuda-runtime",
    ),
    "context": (
        lambda: torch.ones(3),
        {"total_bytes": 100 * MiB, "context_bytes": 200 * MiB},
        "CUDA error: out of memory",
        "cuda-runtime",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LIBRARY_CASES))
def test_library_failures_raise_their_own_text_and_classify_as_oom(case: str) -> None:
    run, settings, text, kind = LIBRARY_CASES[case]
    with simulated_cuda(**settings), pytest.raises(RuntimeError, match=re.escape(text)) as raised:
        run()
    failure = classify(raised.value)
    assert (failure.outcome.value, failure.kind) == ("oom", kind)
