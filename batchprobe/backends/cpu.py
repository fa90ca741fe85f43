"""CPU backend: live tensor bytes from the storage ledger, and a budget that raises real OOMs.

Capacity is the memory the process can still take: the least headroom among the RAM available,
its cgroup's limits and its rlimits (`hostmem`), named in the device's details. A budget is
always in force on CPU, so probing never wakes the operating system's OOM killer: by default half
that headroom, or all of it when an rlimit binds (going over an rlimit fails the allocation,
which a probe catches as an OOM, instead of killing the process).

An rlimit counts the process's mappings, not its tensors. Under one, every step runs with freed
blocks unmapped at once (glibc's mmap threshold fixed; the figures then hold for a training run
with the same setting, `training_environment`), and the limit is re-read as it moves: each new
batch size leaves a library's kernels mapped, and a failed allocation says how much room the host
had left when it failed.
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
    HostLimit,
    MovingLimit,
    address_space_limited,
    binding,
    host_limits,
    inherited,
    mkl_buffer_cache,
    mmap_threshold,
    ram_available,
    set_mmap_threshold,
    training_environment,
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
    """The ledger of one probe; the step's observer. Under a limit on the process's own
    mappings (`limit`), the first failed op also reads what the limit counted then."""

    def __init__(self, ledger: StorageLedger, limit: HostLimit | None = None) -> None:
        self.ledger = ledger
        self.figures = MemoryFigures(start_bytes=ledger.live_bytes)
        self.host_limited = limit is not None
        self.limit = limit
        #: the limit less what it counted when the first op failed (the room the host had)
        self.room_at_failure: int | None = None
        self.counted_at_start = limit.counted() if limit is not None else None
        if limit is not None:
            ledger.on_failure = self._note_failure

    def _note_failure(self) -> None:
        assert self.limit is not None
        counted = self.limit.counted()
        if counted is not None:
            self.room_at_failure = max(0, self.limit.limit_bytes - counted)

    @property
    def limit_at_failure(self) -> int | None:
        """In live tensor bytes, the limit as it stood when the first op failed: the tensors
        live then plus the room the host had left (None: not measured)."""
        failed = self.ledger.failed
        if self.room_at_failure is None or failed is None:
            return None
        return failed[1] + self.room_at_failure

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
        """The ledger's record of the op that failed. A failure of the host's own allocator
        (the ledger never saw the request) asked for more than the room the host had then:
        at least that room plus one byte, in live tensor bytes the limit less what else the
        process had mapped."""
        failed = self.ledger.failed
        if failed is not None and failed[2] is None and self.room_at_failure is not None:
            return failed[0], failed[1], self.room_at_failure + 1
        return failed

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
        #: under a host limit: the limit as it moves with what probes leave mapped
        self._moving: MovingLimit | None = None
        self.mmap_threshold: int | None = None  # fixed while a host limit binds
        self._follow_limit()

    def _follow_limit(self) -> None:
        """While a limit on the process's own mappings binds, every step (probe, warm-up, timed
        step) runs with freed blocks of `mmap_threshold` bytes or more unmapped at once, so what
        a step needs does not depend on the steps before it, and a training run started with
        the same setting (`training_environment`) needs what the probes measured."""
        if self.host_limited and self.mmap_threshold is None:
            threshold, _ = mmap_threshold()
            if set_mmap_threshold(threshold):
                self.mmap_threshold = threshold
        if self.host_limited:
            assert self.limit is not None
            self._moving = MovingLimit(self.limit)

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
            # fixed under an rlimit; null: glibc's own (it rises with large frees, to 32 MiB)
            "malloc_mmap_threshold": mmap_threshold()[0] if address_space_limited() else None,
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
                "malloc_mmap_threshold": self.mmap_threshold,
                "training_environment": self.training_environment(),
                "training_environment_inherited": inherited(self.training_environment()),
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
        meter = CpuMeter(ledger, self.limit if self.host_limited else None)
        if self._moving is not None:
            self._moving.started(meter.counted_at_start)
        failed = False
        try:
            with scope, TrackingMode(ledger):
                yield meter
        except BaseException:
            failed = True
            raise
        finally:
            if self._moving is not None:
                # a failure the steps caught themselves measured nothing of the probe's end
                self._moving.ended(meter.limit_at_failure if failed else None)
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

    def limit_now(self) -> tuple[int, bool] | None:
        """In live tensor bytes: the budget; under a limit on the process's own mappings, the
        limit to aim the next probe at, as it moves with what each batch size leaves mapped
        (`MovingLimit`)."""
        budget = self.budget_bytes
        if self._moving is not None and self._held_bytes is not None:
            moving = self._moving.now(self._held_bytes)
            below = budget is None or self.budget_is_default or moving is None or moving < budget
            if moving is not None and below:
                return moving, True
        return (budget, False) if budget is not None else None

    def training_environment(self) -> dict[str, str]:
        """What a training run's environment must say for the figures to hold here (the
        allocator setting every step ran with under a host limit); empty elsewhere."""
        return training_environment() if self.mmap_threshold is not None else {}

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
        self._follow_limit()  # and what the warm-up mapped is in the baseline now
        self.capacity_bytes = min(self.capacity_bytes, now.headroom_bytes + self._held_bytes)
        self.set_budget(self._budget)

    def estimate_target(self, estimate: EstimateSpec) -> tuple[str, int, Allowance]:
        """The CPU's own budget, with no allowance: the estimate is what find-max will measure."""
        assert self.budget_bytes is not None
        return f"cpu budget ({cpu_name()})", self.budget_bytes, self.allowance(estimate)


BACKEND = CpuBackend
