"""CUDA backend (NVIDIA and ROCm builds): the caching allocator's own figures.

Peak = max_memory_allocated after a reset (reserved reported too); free memory at start from
mem_get_info; a budget through set_per_process_memory_fraction (a cap on PyTorch's allocator, not
isolation); CUDA events for timing. Every CUDA call goes through the driver (`cudadriver.py`):
torch.cuda's documented API, or the simulated GPU where there is none.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from batchprobe import launcher
from batchprobe.backends.base import Math, MemoryFigures
from batchprobe.backends.cudadriver import SIMULATE_ENV, CudaDriver, TorchCuda
from batchprobe.gpus import match_device_name
from batchprobe.results import Allowance, DeviceInfo
from batchprobe.spec import EstimateSpec, Precision, TrainSpec
from batchprobe.units import MemorySize

BLOCK_BYTES = 512  # the caching allocator's smallest block: every allocation rounds up to it
FRAGMENTATION = 0.05  # allocator rounding past 512 B blocks, fragmentation
# The CUDA context (CUDA >= 11.7 loads kernels lazily: ~300-600 MiB, growing as libraries load)
# and cuBLAS/cuDNN handles, outside the allocator
CONTEXT_BYTES = 512 * 1024**2
# NCCL's buffers per communicator, outside the allocator (intra-node: ~0.5-1.6 GiB measured)
NCCL_BYTES = 512 * 1024**2
# cuBLAS takes a workspace from the caching allocator per (thread, stream) that runs a matmul and
# keeps it: the forward's thread and autograd's (torch 2.4-2.14)
CUBLAS_THREADS = 2


def cublas_workspace_bytes(major: int) -> int:
    """torch's default CUBLAS_WORKSPACE_CONFIG: ':4096:8' (32 MiB) from Hopper (sm90) on,
    ':4096:2:16:8' (8,519,680 B) before."""
    return 4096 * 8 * 1024 if major >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8


_TORCH_CUDA = TorchCuda()


def driver() -> CudaDriver:
    """The simulated GPU when BATCHPROBE_SIMULATE_CUDA is set, else torch.cuda."""
    if os.environ.get(SIMULATE_ENV):
        from batchprobe.backends import simcuda

        return simcuda.current()
    return _TORCH_CUDA


def _retries(drv: CudaDriver, index: int) -> int:
    return int(drv.memory_stats(index).get("num_alloc_retries", 0))


class CudaMeter:
    """The step's observer: at each phase change it closes the previous phase's peak and resets
    the allocator's peak counter (host-side bookkeeping: no synchronization needed)."""

    host_limited = False

    def __init__(self, drv: CudaDriver, index: int, start_bytes: int) -> None:
        self.figures = MemoryFigures(start_bytes=start_bytes)
        self.drv = drv
        self.index = index
        self.current_phase = "other"
        self.step_start_retries: int | None = None

    def retained_bytes(self) -> int:
        return max(0, self.drv.memory_allocated(self.index) - self.figures.start_bytes)

    def close(self) -> None:
        return None

    def failed_allocation(self) -> tuple[str, int, int | None] | None:
        return None  # the caching allocator's message says what was allocated and asked for

    def phase(self, name: str) -> None:
        self.close_phase()
        if name == "forward":  # a step begins: close the previous step's retry count
            retries = _retries(self.drv, self.index)
            if self.step_start_retries is not None:
                self.figures.step_retries.append(retries - self.step_start_retries)
            self.step_start_retries = retries
        self.current_phase = name
        self.drv.reset_peak_memory_stats(self.index)

    def close_phase(self) -> None:
        f = self.figures
        peak = self.drv.max_memory_allocated(self.index)
        reserved = self.drv.max_memory_reserved(self.index)
        f.peak_bytes = max(f.peak_bytes, peak)
        f.reserved_bytes = max(f.reserved_bytes or 0, reserved)
        f.phase_peaks[self.current_phase] = max(f.phase_peaks.get(self.current_phase, 0), peak)

    def region(self, name: str) -> None:
        return None  # the allocator sees blocks, not who made them

    def mark(self, tensors: Iterable[torch.Tensor], tag: str) -> None:
        return None


class CudaBackend:
    def __init__(self, index: int | None = None, local_rank: int | None = None) -> None:
        drv = driver()
        if index is None:
            # under torchrun, this rank's GPU: LOCAL_RANK counts ranks on the node, and a
            # launcher may give each rank a single visible GPU (device_count() == 1)
            index = local_rank % drv.device_count() if local_rank is not None else None
        self.driver = drv
        self.index = index if index is not None else drv.current_device()
        self.device = drv.tensor_device(self.index)
        self.collective_backend = drv.collective_backend
        drv.set_device(self.index)
        free, total = drv.mem_get_info(self.index)
        self.free_bytes_at_start: int | None = free
        self.capacity_bytes = total
        self.budget_bytes: int | None = None
        self.budget_is_default = True

    # -- what the class answers before a device is opened -----------------------------------
    @staticmethod
    def is_available() -> bool:
        return driver().is_available()

    @staticmethod
    def device_count() -> int:
        return driver().device_count()

    @staticmethod
    def unavailable(name: str) -> str:
        return (
            f"device {name!r} was requested but no CUDA device is available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
            "Use --device cpu, or install a CUDA build of torch."
        )

    @staticmethod
    def allowance(estimate: EstimateSpec, major: int = 9) -> Allowance:
        """What a GPU of compute capability `major` adds to a traced peak: 512-byte blocks and
        fragmentation; the CUDA context and handles outside the allocator (under torchrun,
        NCCL's buffers too); cuBLAS's workspaces inside it; attention as the fused kernels a GPU
        runs; the optimizer as torch runs it on CUDA tensors (foreach)."""
        fixed = CONTEXT_BYTES + (NCCL_BYTES if launcher.world_size() > 1 else 0)
        return Allowance(
            fragmentation=(
                estimate.fragmentation if estimate.fragmentation is not None else FRAGMENTATION
            ),
            context_bytes=estimate.context_bytes if estimate.context_bytes is not None else fixed,
            workspace_bytes=CUBLAS_THREADS * cublas_workspace_bytes(major),
            round_to=BLOCK_BYTES,
            flash_attention=True,
            foreach=True,
        )

    @staticmethod
    def describe() -> dict[str, object]:
        drv = driver()
        devices = []
        if drv.is_available():
            for i in range(drv.device_count()):
                props = drv.properties(i)
                free, total = drv.mem_get_info(i)
                devices.append(
                    {
                        "index": i,
                        "name": props.name,
                        "total_bytes": total,
                        "free_bytes": free,
                        "capability": f"{props.major}.{props.minor}",
                    }
                )
        versions = drv.versions()
        info: dict[str, object] = {
            "torch_cuda": versions["cuda"],
            "torch_hip": versions["hip"],
            "cuda_available": drv.is_available(),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "cuda_devices": devices,
        }
        if devices:
            info["cudnn"] = versions["cudnn"]
        return info

    # -- the device -------------------------------------------------------------------------
    def info(self) -> DeviceInfo:
        props = self.driver.properties(self.index)
        return DeviceInfo(
            device=f"cuda:{self.index}",
            name=props.name,
            capacity_bytes=self.capacity_bytes,
            free_bytes=self.free_bytes_at_start,
            torch_version=torch.__version__,
            details={
                **self.driver.versions(),
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                "memory": "max_memory_allocated (caching allocator)",
            },
        )

    def set_budget(self, budget: MemorySize | None) -> int | None:
        if budget is None:
            self.budget_bytes = None
            self.budget_is_default = True
            self.driver.set_memory_fraction(1.0, self.index)
            return None
        self.budget_bytes = budget.resolve(self.capacity_bytes)
        self.budget_is_default = False
        fraction = min(1.0, self.budget_bytes / self.capacity_bytes)
        self.driver.set_memory_fraction(fraction, self.index)
        return self.budget_bytes

    @contextmanager
    def track(
        self, persistent: Sequence[torch.Tensor], model: torch.nn.Module | None = None
    ) -> Iterator[CudaMeter]:
        """The allocator's figures over the region. It sees blocks, not tensors: the peak is
        explained from a trace at the size instead (`model` is not needed)."""
        drv, index = self.driver, self.index
        drv.synchronize(index)
        drv.reset_peak_memory_stats(index)
        meter = CudaMeter(drv, index, drv.memory_allocated(index))
        retries = _retries(drv, index)
        try:
            yield meter
        finally:
            drv.synchronize(index)
            meter.close_phase()
            end = _retries(drv, index)
            if meter.step_start_retries is not None:
                meter.figures.step_retries.append(end - meter.step_start_retries)
            meter.figures.alloc_retries = end - retries

    def synchronize(self) -> None:
        self.driver.synchronize(self.index)

    def empty_cache(self) -> None:
        self.driver.empty_cache()

    def mark(self) -> Any:
        event = self.driver.event()
        event.record()
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000.0

    def ddp_device_ids(self) -> list[int] | None:
        return None if self.driver.simulated else [self.index]

    def collective_device(self) -> torch.device | None:
        return None if self.driver.simulated else self.device

    def peak_flops(self, precision: Precision, math: Math) -> float | None:
        gpu = match_device_name(self.info().name)
        if gpu is None:
            return None
        matmul_tf32, conv_tf32 = self.driver.tf32()
        tf32 = matmul_tf32 if math == "matmul" else conv_tf32
        return gpu.peak_flops(precision, tf32=tf32)

    def optimizer_defaults(self) -> dict[str, Any]:
        # torch's default for CUDA tensors (Adam, AdamW, SGD): the multi-tensor path, whose step
        # holds parameter-sized temporaries (e.g. the square roots of the second moments)
        return {"foreach": True}

    def available_now(self) -> int | None:
        free, _ = self.driver.mem_get_info(self.index)
        return free + self.driver.memory_reserved(self.index)

    def configure(self, train: TrainSpec) -> None:
        self.driver.configure(train.cudnn_benchmark, train.tf32)

    def settle(self) -> None:
        """Free memory once the process holds what it holds for its life (context, library
        handles and workspaces, communicators): what is free, plus what this process's
        allocator has reserved and probes reuse."""
        self.free_bytes_at_start = self.available_now()

    def limit_now(self) -> tuple[int, bool] | None:
        return None  # the budget, or the free memory the search watches (available_now)

    def training_environment(self) -> dict[str, str]:
        return {}

    def estimate_target(self, estimate: EstimateSpec) -> tuple[str, int, Allowance]:
        """This GPU's capacity with the GPU allowance — or its budget, which caps the caching
        allocator alone (the context and library memory are outside it): no fixed allowance
        off a budget."""
        allowance = self.allowance(estimate, self.driver.properties(self.index).major)
        label = f"cuda:{self.index} ({self.info().name})"
        if self.budget_bytes:
            return label, self.budget_bytes, dataclasses.replace(allowance, context_bytes=0)
        return label, self.capacity_bytes, allowance


BACKEND = CudaBackend
