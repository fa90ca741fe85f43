"""What a device backend offers, as Protocols: memory figures, a budget, cleanup, timers, and the
facts the rest of batchprobe asks of a device (collective backend, peak FLOP/s, the estimate's
allowance). Nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from batchprobe.results import Allowance, DeviceInfo, PeakBreakdown
from batchprobe.spec import EstimateSpec, Precision, TrainSpec
from batchprobe.units import MemorySize

Math = Literal["matmul", "conv"]


@dataclass
class MemoryFigures:
    """Memory figures of one tracked region (a probe)."""

    peak_bytes: int = 0
    reserved_bytes: int | None = None
    alloc_retries: int = 0
    start_bytes: int = 0
    #: peak within each step phase (batch, forward, backward, optimizer, other)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    #: allocator retries (cudaMalloc failures answered by freeing the cache) in each step
    step_retries: list[int] = field(default_factory=list)
    #: bytes each op's outputs took (a backend that sees ops: the CPU's ledger)
    op_bytes: dict[str, int] | None = None
    #: what filled the peak, asked with the batch size (a backend that sees each storage)
    explained: Callable[[int, Literal["measured", "traced"]], PeakBreakdown] | None = None

    @property
    def line_bytes(self) -> int | None:
        """Peak of the phases that grow with the batch (forward, backward), if known."""
        values = [self.phase_peaks[p] for p in ("forward", "backward") if p in self.phase_peaks]
        return max(values) if values else None

    @property
    def flat_bytes(self) -> int | None:
        """Peak of the optimizer step, if known."""
        return self.phase_peaks.get("optimizer")


class Meter(Protocol):
    """A tracked region. It is also the training step's observer: told each phase, and which
    tensors are gradients and optimizer state."""

    figures: MemoryFigures
    #: the process runs under a limit that fails its allocations (an rlimit): any allocation
    #: that fails — a library's scratch memory as well as a tensor — is that limit
    host_limited: bool

    def phase(self, name: str) -> None: ...

    def mark(self, tensors: Iterable[torch.Tensor], tag: str) -> None: ...

    def region(self, name: str) -> None:
        """The step's region outside any module (the loss): for a meter that explains."""

    def retained_bytes(self) -> int:
        """Bytes allocated inside the region that are still held (call after cleanup)."""
        ...

    def close(self) -> None:
        """Release what the meter holds; call after `retained_bytes()`."""
        ...

    def failed_allocation(self) -> tuple[str, int, int | None] | None:
        """After a failure: the op that failed, the bytes live before it and what it asked for
        (None: the backend did not see it; the allocator's message may say)."""
        ...


class Backend(Protocol):
    device: torch.device
    capacity_bytes: int
    budget_bytes: int | None
    #: True while no budget was asked for (CPU then applies its default fraction of RAM)
    budget_is_default: bool
    #: free bytes when the backend was created (CUDA: mem_get_info; CPU: MemAvailable)
    free_bytes_at_start: int | None
    #: torch.distributed backend for the data collectives under torchrun (nccl, gloo)
    collective_backend: str

    def info(self) -> DeviceInfo: ...

    def set_budget(self, budget: MemorySize | None) -> int | None:
        """Cap what probes may use; None means the backend's default. Returns the cap in bytes."""
        ...

    def track(
        self, persistent: Sequence[torch.Tensor], model: torch.nn.Module | None = None
    ) -> AbstractContextManager[Meter]:
        """Measure peak memory of the steps run inside; enforce the budget. `persistent`: the
        tensors that live across steps (parameters, buffers)."""
        ...

    def synchronize(self) -> None: ...

    def empty_cache(self) -> None: ...

    def mark(self) -> Any:
        """A point in time on the device's stream (an event on CUDA)."""
        ...

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds between two marks (synchronizes)."""
        ...

    def ddp_device_ids(self) -> list[int] | None:
        """`device_ids` for DistributedDataParallel (None on the CPU)."""
        ...

    def collective_device(self) -> torch.device | None:
        """The device to bind the process group to (`init_process_group(device_id=...)`: NCCL
        forms its communicator on it at once), None where that does not apply."""
        ...

    def peak_flops(self, precision: Precision, math: Math) -> float | None:
        """The device's dense peak FLOP/s for this precision and kind of math (matmuls and
        convolutions may run in TF32 for float32 inputs), when known (for MFU)."""
        ...

    def optimizer_defaults(self) -> dict[str, Any]:
        """How torch runs the optimizer here when the spec does not say (CUDA: foreach)."""
        ...

    def available_now(self) -> int | None:
        """Memory this process could use now (free, plus what its allocator caches); None where
        nothing else competes for it (the CPU's budget)."""
        ...

    def estimate_target(self, estimate: EstimateSpec) -> tuple[str, int, Allowance]:
        """(what, capacity, allowance) when `estimate` targets this device itself."""
        ...

    def limit_now(self) -> tuple[int, bool] | None:
        """The limit the next probe will face, in the bytes probes measure, as the device knows
        it now, and whether it moves with what the probes themselves map (the CPU under an
        rlimit: each new batch size leaves its kernels mapped; what fit before still fits a
        process that did not run them) rather than because the limit changed (a budget another
        layer lowered). None where the device cannot say (a GPU: the search watches its free
        memory apart)."""
        ...

    def training_environment(self) -> dict[str, str]:
        """Environment variables a training run needs for the figures to hold on this device
        (the CPU under an rlimit: the allocator setting every step ran with); usually none."""
        ...

    def settle(self) -> None:
        """After the warm-up step: re-read the memory free to probes (the context, library
        handles and workspaces, the NCCL communicator now exist)."""
        ...

    def configure(self, train: TrainSpec) -> None:
        """Apply the run's device settings (cuDNN autotuning, TF32) before the model runs."""
        ...


@dataclass
class DeviceView:
    """A device as a fresh child process saw it, for a process that holds none of its memory:
    the parent of isolated probes. It answers what a search asks (limit, description, the
    estimate's target); it runs nothing."""

    description: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("meta"))

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> DeviceView:
        return cls(description)

    @property
    def capacity_bytes(self) -> int:
        return int(self.description["capacity_bytes"])

    @property
    def budget_bytes(self) -> int | None:
        return self.description["budget_bytes"]

    @property
    def budget_is_default(self) -> bool:
        return bool(self.description["budget_is_default"])

    @property
    def free_bytes_at_start(self) -> int | None:
        return self.description["free_bytes_at_start"]

    @property
    def collective_backend(self) -> str:
        return str(self.description["collective_backend"])

    def info(self) -> DeviceInfo:
        return DeviceInfo(**self.description["info"])

    def estimate_target(self, estimate: EstimateSpec) -> tuple[str, int, Allowance]:
        label, capacity, allowance = self.description["estimate_target"]
        return label, capacity, Allowance(**allowance)

    def peak_flops(self, precision: Precision, math: Math) -> float | None:
        value = self.description["peak_flops"].get(f"{precision}/{math}")
        return float(value) if value is not None else None

    def optimizer_defaults(self) -> dict[str, Any]:
        return dict(self.description["optimizer_defaults"])

    def available_now(self) -> int | None:
        return None  # each child measures for itself

    def training_environment(self) -> dict[str, str]:
        return dict(self.description.get("training_environment", {}))


class BackendType(Protocol):
    """What a backend class answers before any device is opened."""

    def __call__(self, index: int | None = None, local_rank: int | None = None) -> Backend: ...

    def is_available(self) -> bool: ...

    def device_count(self) -> int: ...

    def unavailable(self, name: str) -> str:
        """Why `name` cannot be opened here, and the fix."""
        ...

    def allowance(self, estimate: EstimateSpec, major: int = 9) -> Allowance:
        """What this kind of device adds to a traced peak (for `estimate` targets); `major`:
        the GPU generation where it matters."""
        ...

    def describe(self) -> dict[str, object]:
        """This backend's part of `batchprobe env`."""
        ...
