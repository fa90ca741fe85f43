"""The CUDA calls the CUDA backend makes, behind one small interface.

`TorchCuda` is `torch.cuda` itself. Without a GPU, the same backend code runs against the
simulated device in `batchprobe.backends.simcuda` (`cuda.driver()` picks it when
`BATCHPROBE_SIMULATE_CUDA` is set),
which behaves as a GPU does where batchprobe's control flow depends on it: the caching allocator's
blocks, segments and reserved-memory cap, its OOM texts, library workspaces and errors, sticky
errors, other processes' memory, NCCL's buffers and watchdog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

SIMULATE_ENV = "BATCHPROBE_SIMULATE_CUDA"


@dataclass(frozen=True)
class DeviceProps:
    name: str
    major: int
    minor: int
    multi_processor_count: int


class Event(Protocol):
    def record(self) -> None: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end: Any) -> float:
        """Milliseconds from this event to `end`."""
        ...


class CudaDriver(Protocol):
    #: the torch.distributed backend for data collectives (nccl; the simulator's own otherwise)
    collective_backend: str
    simulated: bool

    def is_available(self) -> bool: ...

    def device_count(self) -> int: ...

    def current_device(self) -> int: ...

    def tensor_device(self, index: int) -> torch.device:
        """Where the tensors of device `index` live (cuda:N; the CPU for the simulator)."""
        ...

    def set_device(self, index: int) -> None: ...

    def properties(self, index: int) -> DeviceProps: ...

    def mem_get_info(self, index: int) -> tuple[int, int]: ...

    def set_memory_fraction(self, fraction: float, index: int) -> None: ...

    def memory_allocated(self, index: int) -> int: ...

    def memory_reserved(self, index: int) -> int: ...

    def max_memory_allocated(self, index: int) -> int: ...

    def max_memory_reserved(self, index: int) -> int: ...

    def reset_peak_memory_stats(self, index: int) -> None: ...

    def memory_stats(self, index: int) -> dict[str, Any]: ...

    def synchronize(self, index: int) -> None: ...

    def empty_cache(self) -> None: ...

    def event(self) -> Event: ...

    def configure(self, benchmark: bool, tf32: bool | None) -> None:
        """cuDNN autotuning and TF32 math, as the training run would set them (None: torch's
        defaults — TF32 for convolutions, full FP32 for matmuls)."""
        ...

    def tf32(self) -> tuple[bool, bool]:
        """Whether (matmuls, convolutions) run in TF32 for float32 inputs."""
        ...

    def versions(self) -> dict[str, Any]:
        """CUDA / HIP / cuDNN versions, for `env` and the device details."""
        ...


class TorchCuda:
    """torch.cuda, as is."""

    collective_backend = "nccl"
    simulated = False

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def tensor_device(self, index: int) -> torch.device:
        return torch.device("cuda", index)

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def properties(self, index: int) -> DeviceProps:
        p = torch.cuda.get_device_properties(index)
        return DeviceProps(p.name, p.major, p.minor, p.multi_processor_count)

    def mem_get_info(self, index: int) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)

    def set_memory_fraction(self, fraction: float, index: int) -> None:
        torch.cuda.set_per_process_memory_fraction(float(fraction), index)

    def memory_allocated(self, index: int) -> int:
        return int(torch.cuda.memory_allocated(index))

    def memory_reserved(self, index: int) -> int:
        return int(torch.cuda.memory_reserved(index))

    def max_memory_allocated(self, index: int) -> int:
        return int(torch.cuda.max_memory_allocated(index))

    def max_memory_reserved(self, index: int) -> int:
        return int(torch.cuda.max_memory_reserved(index))

    def reset_peak_memory_stats(self, index: int) -> None:
        torch.cuda.reset_peak_memory_stats(index)

    def memory_stats(self, index: int) -> dict[str, Any]:
        return dict(torch.cuda.memory_stats(index))

    def synchronize(self, index: int) -> None:
        torch.cuda.synchronize(index)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def event(self) -> Event:
        return torch.cuda.Event(enable_timing=True)

    def configure(self, benchmark: bool, tf32: bool | None) -> None:
        torch.backends.cudnn.benchmark = benchmark
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32

    def tf32(self) -> tuple[bool, bool]:
        matmul = torch.backends.cuda.matmul.allow_tf32 or (
            torch.get_float32_matmul_precision() != "highest"
        )
        return bool(matmul), bool(torch.backends.cudnn.allow_tf32)

    def versions(self) -> dict[str, Any]:
        cudnn = torch.backends.cudnn
        return {
            "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "cudnn": cudnn.version() if cudnn.is_available() else None,
        }
