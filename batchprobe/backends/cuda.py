"""CUDA backend (NVIDIA and ROCm builds): the caching allocator's own figures.

Peak = max_memory_allocated after a reset (reserved reported too); free memory at start from
mem_get_info; a budget through set_per_process_memory_fraction (a cap on PyTorch's allocator, not
isolation); CUDA events for timing. Only documented torch.cuda APIs are used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from batchprobe.backends.base import MemoryFigures
from batchprobe.gpus import match_device_name
from batchprobe.results import Allowance, DeviceInfo
from batchprobe.spec import EstimateSpec, Precision
from batchprobe.units import MemorySize

BLOCK_BYTES = 512  # the caching allocator's smallest block: every allocation rounds up to it
FRAGMENTATION = 0.05  # allocator rounding past 512 B blocks, fragmentation
CONTEXT_BYTES = 512 * 1024**2  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator


def _retries(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


class CudaMeter:
    """The step's observer: at each phase change it closes the previous phase's peak and resets
    the allocator's peak counter (host-side bookkeeping: no synchronization needed)."""

    def __init__(self, device: torch.device, start_bytes: int) -> None:
        self.figures = MemoryFigures(start_bytes=start_bytes)
        self.device = device
        self.current_phase = "other"
        self.step_start_retries: int | None = None

    def retained_bytes(self) -> int:
        return max(0, torch.cuda.memory_allocated(self.device) - self.figures.start_bytes)

    def close(self) -> None:
        return None

    def phase(self, name: str) -> None:
        self.close_phase()
        if name == "forward":  # a step begins: close the previous step's retry count
            retries = _retries(self.device)
            if self.step_start_retries is not None:
                self.figures.step_retries.append(retries - self.step_start_retries)
            self.step_start_retries = retries
        self.current_phase = name
        torch.cuda.reset_peak_memory_stats(self.device)

    def close_phase(self) -> None:
        f = self.figures
        peak = int(torch.cuda.max_memory_allocated(self.device))
        reserved = int(torch.cuda.max_memory_reserved(self.device))
        f.peak_bytes = max(f.peak_bytes, peak)
        f.reserved_bytes = max(f.reserved_bytes or 0, reserved)
        f.phase_peaks[self.current_phase] = max(f.phase_peaks.get(self.current_phase, 0), peak)

    def mark(self, tensors: Iterable[torch.Tensor], tag: str) -> None:
        return None


class CudaBackend:
    collective_backend = "nccl"

    def __init__(self, index: int | None = None, local_rank: int | None = None) -> None:
        if index is None:
            index = local_rank if local_rank is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        self.free_bytes_at_start: int | None = int(free)
        self.capacity_bytes = int(total)
        self.budget_bytes: int | None = None
        self.budget_is_default = True

    # -- what the class answers before a device is opened -----------------------------------
    @staticmethod
    def is_available() -> bool:
        return torch.cuda.is_available()

    @staticmethod
    def device_count() -> int:
        return torch.cuda.device_count()

    @staticmethod
    def unavailable(name: str) -> str:
        return (
            f"device {name!r} was requested but no CUDA device is available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
            "Use --device cpu, or install a CUDA build of torch."
        )

    @staticmethod
    def allowance(estimate: EstimateSpec) -> Allowance:
        """512-byte blocks, fragmentation, and the CUDA context and library workspaces outside
        the allocator; attention as the fused kernels a GPU runs."""
        return Allowance(
            fragmentation=(
                estimate.fragmentation if estimate.fragmentation is not None else FRAGMENTATION
            ),
            context_bytes=(
                estimate.context_bytes if estimate.context_bytes is not None else CONTEXT_BYTES
            ),
            round_to=BLOCK_BYTES,
            flash_attention=True,
        )

    @staticmethod
    def describe() -> dict[str, object]:
        devices = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                free, total = torch.cuda.mem_get_info(i)
                devices.append(
                    {
                        "index": i,
                        "name": props.name,
                        "total_bytes": int(total),
                        "free_bytes": int(free),
                        "capability": f"{props.major}.{props.minor}",
                    }
                )
        info: dict[str, object] = {
            "torch_cuda": torch.version.cuda,
            "torch_hip": getattr(torch.version, "hip", None),
            "cuda_available": torch.cuda.is_available(),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "cuda_devices": devices,
        }
        if devices:
            info["cudnn"] = torch.backends.cudnn.version()
        return info

    # -- the device -------------------------------------------------------------------------
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
    def track(self, persistent: Sequence[torch.Tensor]) -> Iterator[CudaMeter]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        meter = CudaMeter(self.device, torch.cuda.memory_allocated(self.device))
        retries = _retries(self.device)
        try:
            yield meter
        finally:
            torch.cuda.synchronize(self.device)
            meter.close_phase()
            end = _retries(self.device)
            if meter.step_start_retries is not None:
                meter.figures.step_retries.append(end - meter.step_start_retries)
            meter.figures.alloc_retries = end - retries

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

    def ddp_device_ids(self) -> list[int] | None:
        return [self.device.index] if self.device.index is not None else None

    def peak_flops(self, precision: Precision) -> float | None:
        gpu = match_device_name(self.info().name)
        return gpu.peak_flops(precision) if gpu else None

    def estimate_target(self, estimate: EstimateSpec) -> tuple[str, int, Allowance]:
        """This GPU's capacity (or budget) with the GPU allowance."""
        capacity = self.budget_bytes or self.capacity_bytes
        return f"{self.device} ({self.info().name})", capacity, self.allowance(estimate)


BACKEND = CudaBackend
