"""CPU backend: live tensor bytes from the storage ledger, and a budget that raises real OOMs.

A budget is always in force on CPU (default: half the RAM available at start), so probing never
wakes the operating system's OOM killer.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from batchprobe.backends.base import DeviceInfo, Meter
from batchprobe.memory import StorageLedger, TrackingMode
from batchprobe.step import TrainStep
from batchprobe.units import MemorySize

DEFAULT_BUDGET_FRACTION = 0.5


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 8 * 1024**3


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


class CpuMeter(Meter):
    def __init__(self, ledger: StorageLedger) -> None:
        super().__init__()
        self.ledger = ledger

    def retained_bytes(self) -> int:
        """Net growth of live bytes since the probe began: new storages still alive, less any
        persistent storage the probe freed (FSDP, for one, replaces buffers between steps)."""
        return max(0, self.ledger.live_bytes - self.start_bytes)

    def close(self) -> None:
        self.ledger.close()


class CpuBackend:
    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.free_bytes_at_start: int | None = available_ram_bytes()
        self.capacity_bytes = self.free_bytes_at_start or 0
        self.budget_bytes: int | None = int(DEFAULT_BUDGET_FRACTION * self.capacity_bytes)
        self.budget_is_default = True

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            device="cpu",
            name=cpu_name(),
            capacity_bytes=self.capacity_bytes,
            free_bytes=self.free_bytes_at_start,
            torch_version=torch.__version__,
            details={
                "threads": torch.get_num_threads(),
                "capacity": "RAM available at start (MemAvailable)",
                "memory": "live tensor bytes (storage ledger)",
            },
        )

    def set_budget(self, budget: MemorySize | None) -> int | None:
        if budget is None:
            self.budget_bytes = int(DEFAULT_BUDGET_FRACTION * self.capacity_bytes)
            self.budget_is_default = True
        else:
            self.budget_bytes = budget.resolve(self.capacity_bytes)
            self.budget_is_default = False
        return self.budget_bytes

    @contextmanager
    def track(self, step: TrainStep, extra_roots: Sequence[torch.Tensor] = ()) -> Iterator[Meter]:
        ledger = StorageLedger(budget_bytes=self.budget_bytes)
        ledger.mark(step.persistent_tensors(), "parameters")
        ledger.mark(extra_roots, "parameters")
        meter = CpuMeter(ledger)
        meter.start_bytes = ledger.live_bytes
        step.observer = ledger
        try:
            with TrackingMode(ledger):
                yield meter
        finally:
            step.observer = None
            meter.peak_bytes = ledger.peak_bytes
            meter.phase_peaks = dict(ledger.phase_peaks)

    def synchronize(self) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def mark(self) -> Any:
        return time.perf_counter()

    def elapsed_s(self, start: Any, end: Any) -> float:
        return float(end - start)
