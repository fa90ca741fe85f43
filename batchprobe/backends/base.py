"""What a device backend offers: memory figures, a budget, cleanup and timers. Nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from batchprobe.step import TrainStep
from batchprobe.units import MemorySize


@dataclass(frozen=True)
class DeviceInfo:
    device: str
    name: str
    capacity_bytes: int
    free_bytes: int | None
    torch_version: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Meter:
    """Memory figures of one tracked region (a probe)."""

    peak_bytes: int = 0
    reserved_bytes: int | None = None
    alloc_retries: int = 0
    start_bytes: int = 0
    #: peak within each step phase (batch, forward, backward, optimizer, other)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    #: allocator retries (cudaMalloc failures answered by freeing the cache) in each step
    step_retries: list[int] = field(default_factory=list)

    @property
    def line_bytes(self) -> int | None:
        """Peak of the phases that grow with the batch (forward, backward), if known."""
        values = [self.phase_peaks[p] for p in ("forward", "backward") if p in self.phase_peaks]
        return max(values) if values else None

    def retained_bytes(self) -> int:
        """Bytes allocated inside the region that are still held (call after cleanup)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the meter holds; call after `retained_bytes()`."""


class Backend(Protocol):
    device: torch.device
    capacity_bytes: int
    budget_bytes: int | None
    #: True while no budget was asked for (CPU then applies its default fraction of RAM)
    budget_is_default: bool
    #: free bytes when the backend was created (CUDA: mem_get_info; CPU: MemAvailable)
    free_bytes_at_start: int | None

    def info(self) -> DeviceInfo: ...

    def set_budget(self, budget: MemorySize | None) -> int | None:
        """Cap what probes may use; None means the backend's default. Returns the cap in bytes."""
        ...

    def track(
        self, step: TrainStep, extra_roots: Sequence[torch.Tensor] = ()
    ) -> AbstractContextManager[Meter]:
        """Measure peak memory of the steps run inside; enforce the budget."""
        ...

    def synchronize(self) -> None: ...

    def empty_cache(self) -> None: ...

    def mark(self) -> Any:
        """A point in time on the device's stream (an event on CUDA)."""
        ...

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds between two marks (synchronizes)."""
        ...
