"""CPU backend: live tensor bytes from the storage ledger, and a budget that raises real OOMs.

Capacity is the memory the process can still take: the least headroom among the RAM available,
its cgroup's limits and its rlimits (`hostmem`), named in the device's details. A budget is
always in force on CPU, so probing never wakes the operating system's OOM killer: by default half
that headroom, or all of it when an rlimit binds (going over an rlimit fails the allocation,
which a probe catches as an OOM, instead of killing the process).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from batchprobe.backends.base import Math, MemoryFigures
from batchprobe.backends.hostmem import (
    PROBING,
    TIMING,
    HostLimit,
    binding,
    host_limits,
    mkl_buffer_cache,
    ram_available,
    set_mmap_threshold,
)
from batchprobe.memory import ModuleScope, StorageLedger, TrackingMode
from batchprobe.results import Allowance, DeviceInfo
from batchprobe.spec import EstimateSpec, Precision, TrainSpec
from batchprobe.units import MemorySize

DEFAULT_BUDGET_FRACTION = 0.5


def available_ram_bytes() -> int:
    """MemAvailable (Linux), else total physical memory."""
    available = ram_available()
    if available is not None:
        return available
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


class CpuMeter:
    """The ledger of one probe; the step's observer."""

    def __init__(self, ledger: StorageLedger, host_limited: bool = False) -> None:
        self.ledger = ledger
        self.figures = MemoryFigures(start_bytes=ledger.live_bytes)
        self.host_limited = host_limited

    def phase(self, name: str) -> None:
        self.ledger.phase(name)

    def mark(self, tensors: Iterable[torch.Tensor], tag: str) -> None:
        self.ledger.mark(tensors, tag)

    def region(self, name: str) -> None:
        self.ledger.region(name)

    def retained_bytes(self) -> int:
        """Net growth of live bytes since the probe began: new storages still alive, less any
        persistent storage the probe freed (FSDP, for one, replaces buffers between steps)."""
        return max(0, self.ledger.live_bytes - self.figures.start_bytes)

    def failed_allocation(self) -> tuple[str, int, int | None] | None:
        return self.ledger.failed

    def close(self) -> None:
        self.ledger.close()


class CpuBackend:
    collective_backend = "gloo"

    def __init__(self, index: int | None = None, local_rank: int | None = None) -> None:
        self.device = torch.device("cpu")
        self.limit: HostLimit | None = binding(host_limits())
        if self.limit is None:  # no /proc: the physical memory
            self.limit = HostLimit("physical memory", available_ram_bytes(), 0)
        self.free_bytes_at_start: int | None = self.limit.headroom_bytes
        self.capacity_bytes = self.limit.headroom_bytes
        self.budget_bytes: int | None = self.default_budget()
        self.budget_is_default = True
        self._budget: MemorySize | None = None
        self._held_bytes: int | None = None  # what the last region found held (parameters,
        # buffers: the persistent tensors)

    def default_budget(self) -> int:
        """All the headroom under an rlimit (its failures are caught), else half of it."""
        if self.host_limited:
            return self.capacity_bytes
        return int(DEFAULT_BUDGET_FRACTION * self.capacity_bytes)

    # -- what the class answers before a device is opened -----------------------------------
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def unavailable(name: str) -> str:
        return f"device {name!r} is not available"

    @staticmethod
    def allowance(estimate: EstimateSpec, major: int = 0) -> Allowance:
        """Nothing: the ledger counts exactly what a trace counts."""
        return Allowance()

    @staticmethod
    def describe() -> dict[str, object]:
        return {
            "cpu": cpu_name(),
            "cpu_threads": torch.get_num_threads(),
            "ram_available_bytes": available_ram_bytes(),
            "mkl_buffer_cache": mkl_buffer_cache(),
        }

    # -- the device -------------------------------------------------------------------------
    def info(self) -> DeviceInfo:
        return DeviceInfo(
            device="cpu",
            name=cpu_name(),
            capacity_bytes=self.capacity_bytes,
            free_bytes=self.free_bytes_at_start,
            torch_version=torch.__version__,
            details={
                "threads": torch.get_num_threads(),
                "capacity": self.limit.label if self.limit else "RAM available at start",
                "memory": "live tensor bytes (storage ledger)",
                "mkl_buffer_cache": mkl_buffer_cache(),
            },
        )

    def set_budget(self, budget: MemorySize | None) -> int | None:
        self._budget = budget
        if budget is None:
            self.budget_bytes = self.default_budget()
            self.budget_is_default = True
        else:
            self.budget_bytes = budget.resolve(self.capacity_bytes)
            self.budget_is_default = False
        return self.budget_bytes

    @contextmanager
    def track(
        self, persistent: Sequence[torch.Tensor], model: torch.nn.Module | None = None
    ) -> Iterator[CpuMeter]:
        """The ledger over the region; with `model`, it also notes what made each storage, and
        the figures explain the peak (`MemoryFigures.explained`)."""
        ledger = StorageLedger(budget_bytes=self.budget_bytes, by_op={})
        scope = ModuleScope(model) if model is not None else contextlib.nullcontext()
        ledger.scope = scope if isinstance(scope, ModuleScope) else None
        ledger.mark(persistent, "parameters")
        self._held_bytes = ledger.live_bytes
        host_limited = self.host_limited
        meter = CpuMeter(ledger, host_limited=host_limited)
        if host_limited:  # what the probe frees goes back to the kernel: the next finds its room
            set_mmap_threshold(PROBING)
        try:
            with scope, TrackingMode(ledger):
                yield meter
        finally:
            if host_limited:  # timed steps run as glibc would run them
                set_mmap_threshold(TIMING)
            meter.figures.peak_bytes = ledger.peak_bytes
            meter.figures.phase_peaks = dict(ledger.phase_peaks)
            meter.figures.op_bytes = dict(ledger.by_op or {})
            if ledger.scope is not None:
                meter.figures.explained = ledger.explain

    @property
    def host_limited(self) -> bool:
        """The binding limit fails allocations (an rlimit): probes meet it as an exception."""
        return bool(self.limit and self.limit.catchable)

    def synchronize(self) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def mark(self) -> Any:
        return time.perf_counter()

    def elapsed_s(self, start: Any, end: Any) -> float:
        return float(end - start)

    def ddp_device_ids(self) -> list[int] | None:
        return None

    def collective_device(self) -> torch.device | None:
        return None

    def peak_flops(self, precision: Precision, math: Math) -> float | None:
        return None  # no datasheet peak for CPUs: give plan.peak_tflops for MFU

    def optimizer_defaults(self) -> dict[str, Any]:
        return {}  # torch's own choice on the CPU: the single-tensor loops

    def available_now(self) -> int | None:
        return None  # the budget is the limit on the CPU

    def configure(self, train: TrainSpec) -> None:
        return None  # cuDNN and TF32 do not apply to the CPU

    def settle(self) -> None:
        """Under an rlimit, capacity becomes the room left once the model has run (its first
        steps map threads, kernels and allocator arenas: address space no tensor can have) plus
        what it holds for its life (the parameters), which the ledger counts. Elsewhere (the
        RAM, a cgroup) capacity stays what was free at start: a warm-up changes nothing there."""
        # every limit again: what the warm-up mapped may have made an rlimit the binding one
        now = binding(host_limits())
        if now is None or not now.catchable or self._held_bytes is None:
            return
        self.limit = now
        self.capacity_bytes = min(self.capacity_bytes, now.headroom_bytes + self._held_bytes)
        self.set_budget(self._budget)

    def estimate_target(self, estimate: EstimateSpec) -> tuple[str, int, Allowance]:
        """The CPU's own budget, with no allowance: the estimate is what find-max will measure."""
        assert self.budget_bytes is not None
        return f"cpu budget ({cpu_name()})", self.budget_bytes, self.allowance(estimate)


BACKEND = CpuBackend
