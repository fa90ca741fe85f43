"""CUDA backend (NVIDIA and ROCm builds): the caching allocator's own figures.

Peak = max_memory_allocated after a reset (reserved reported too); free memory at start from
mem_get_info; a budget through set_per_process_memory_fraction (a cap on PyTorch's allocator, not
isolation); CUDA events for timing. Only documented torch.cuda APIs are used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from batchprobe.backends.base import DeviceInfo, Meter
from batchprobe.step import TrainStep
from batchprobe.units import MemorySize


def _retries(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


class CudaMeter(Meter):
    """Also the step's observer: at each phase change it closes the previous phase's peak and
    resets the allocator's peak counter (host-side bookkeeping: no synchronization needed)."""

    def __init__(self, device: torch.device, start_bytes: int) -> None:
        super().__init__(start_bytes=start_bytes)
        self.device = device
        self.current_phase = "other"
        self._step_start_retries: int | None = None

    def retained_bytes(self) -> int:
        return max(0, torch.cuda.memory_allocated(self.device) - self.start_bytes)

    def phase(self, name: str) -> None:
        self.close_phase()
        if name == "forward":  # a step begins: close the previous step's retry count
            retries = _retries(self.device)
            if self._step_start_retries is not None:
                self.step_retries.append(retries - self._step_start_retries)
            self._step_start_retries = retries
        self.current_phase = name
        torch.cuda.reset_peak_memory_stats(self.device)

    def close_phase(self) -> None:
        peak = int(torch.cuda.max_memory_allocated(self.device))
        reserved = int(torch.cuda.max_memory_reserved(self.device))
        self.peak_bytes = max(self.peak_bytes, peak)
        self.reserved_bytes = max(self.reserved_bytes or 0, reserved)
        self.phase_peaks[self.current_phase] = max(
            self.phase_peaks.get(self.current_phase, 0), peak
        )

    def mark(self, tensors: Any, tag: str) -> None:
        return None


class CudaBackend:
    def __init__(self, device: torch.device) -> None:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        torch.cuda.set_device(device)
        free, total = torch.cuda.mem_get_info(device)
        self.free_bytes_at_start: int | None = int(free)
        self.capacity_bytes = int(total)
        self.budget_bytes: int | None = None
        self.budget_is_default = True

    def info(self) -> DeviceInfo:
        props = torch.cuda.get_device_properties(self.device)
        return DeviceInfo(
            device=str(self.device),
            name=props.name,
            capacity_bytes=self.capacity_bytes,
            free_bytes=self.free_bytes_at_start,
            torch_version=torch.__version__,
            details={
                "cuda": torch.version.cuda,
                "hip": getattr(torch.version, "hip", None),
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "cudnn": torch.backends.cudnn.version()
                if torch.backends.cudnn.is_available()
                else None,
                "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                "memory": "max_memory_allocated (caching allocator)",
            },
        )

    def set_budget(self, budget: MemorySize | None) -> int | None:
        if budget is None:
            self.budget_bytes = None
            self.budget_is_default = True
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            return None
        self.budget_bytes = budget.resolve(self.capacity_bytes)
        self.budget_is_default = False
        fraction = min(1.0, self.budget_bytes / self.capacity_bytes)
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)
        return self.budget_bytes

    @contextmanager
    def track(self, step: TrainStep, extra_roots: Sequence[torch.Tensor] = ()) -> Iterator[Meter]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        meter = CudaMeter(self.device, torch.cuda.memory_allocated(self.device))
        retries = _retries(self.device)
        step.observer = meter
        try:
            yield meter
        finally:
            step.observer = None
            torch.cuda.synchronize(self.device)
            meter.close_phase()
            end = _retries(self.device)
            if meter._step_start_retries is not None:
                meter.step_retries.append(end - meter._step_start_retries)
            meter.alloc_retries = end - retries

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0
