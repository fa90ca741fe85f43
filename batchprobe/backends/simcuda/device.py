"""A simulated CUDA device: the CUDA backend's control flow, run on the CPU.

Tensors stay on the CPU. A TorchDispatchMode sees every op's output storages and places them in
a model of the caching allocator (`allocator.py`), so `memory_allocated`, `memory_reserved`, the
peaks, `num_alloc_retries` and the OOM itself behave as on a GPU. Around the ops it models what
the libraries do (torch 2.4-2.14):

- cuBLAS: the first matmul of each thread — forward, and autograd's own thread in backward —
  creates a handle (device memory outside the allocator; under memory pressure
  `CUBLAS_STATUS_NOT_INITIALIZED when calling cublasCreate(handle)`) and a workspace taken from
  the allocator and kept for the life of the process (32 MiB on sm90 and later, 8,519,680 B
  before);
- cuDNN: each convolution takes a transient workspace from the allocator; with
  `cudnn.benchmark` the first call of a shape picks the fastest algorithm that fits, so its
  workspace grows with the memory free at that moment;
- library scratch outside the allocator (per call, configurable): when it does not fit, the
  library's own error text (CUBLAS_STATUS_ALLOC_FAILED, cuDNN v9's "FIND/GET was unable to find
  an engine", CUFFT_ALLOC_FAILED, a raw "CUDA error: out of memory");
- the CUDA context, created by the first CUDA call, outside the allocator;
- other processes on the same device, through a shared state directory;
- sticky errors: after an illegal memory access or a device-side assert, every later launch,
  synchronize, empty_cache, mem_get_info and statistics call raises the same error.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from batchprobe.backends.cudadriver import DeviceProps, TorchCuda
from batchprobe.backends.simcuda.allocator import (
    Block,
    CachingAllocator,
    SegmentRefused,
    format_size,
)
from batchprobe.backends.simcuda.config import SimConfig

aten = torch.ops.aten
_CUBLAS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.mv, aten.addmv, aten.dot}
_CUDNN = {aten.convolution, aten.convolution_backward}
_CUFFT = {aten._fft_r2c, aten._fft_c2c, aten._fft_c2r}

#: cudaError_t codes of the sticky errors and the raw OOM, with cudaGetErrorString's text
FAULTS = {
    "illegal-address": (700, "cudaErrorIllegalAddress", "an illegal memory access was encountered"),
    "assert": (710, "cudaErrorAssert", "device-side assert triggered"),
    "launch-failure": (719, "cudaErrorLaunchFailure", "unspecified launch failure"),
}
_OOM_CODE = (2, "cudaErrorMemoryAllocation", "out of memory")


def _torch_minor() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def accelerator_error(code: int, name: str, text: str) -> RuntimeError:
    """The exception torch raises for a failed CUDA runtime call (C10_CUDA_CHECK): an
    AcceleratorError carrying the cudaError_t from torch 2.8, a RuntimeError before."""
    version = _torch_minor()
    lines = [f"CUDA error: {text}"]
    if version >= (2, 9):
        lines.append(
            f"Search for `{name}' in https://docs.nvidia.com/cuda/cuda-runtime-api/"
            "group__CUDART__TYPES.html for more information."
        )
    if code != 2 or version < (2, 13):
        lines.append(
            "CUDA kernel errors might be asynchronously reported at some other API call, so the "
            "stacktrace below might be incorrect."
        )
        lines.append("For debugging consider passing CUDA_LAUNCH_BLOCKING=1")
    else:
        lines.append("For more detailed error information, run with CUDA_LOG_FILE=stderr")
    lines.append("Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
    cls = getattr(torch, "AcceleratorError", RuntimeError)
    exc = cls("\n".join(lines))
    if cls is not RuntimeError:
        setattr(exc, "error_code", code)  # noqa: B010  (set by torch's C++ translation)
    return exc


def _oom_tail() -> str:
    version = _torch_minor()
    conf = "PYTORCH_ALLOC_CONF" if version == (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"
    url = (
        "https://docs.pytorch.org/docs/stable/notes/cuda.html"
        "#optimizing-memory-usage-with-pytorch-cuda-alloc-conf"
        if version >= (2, 11)
        else "https://pytorch.org/docs/stable/notes/cuda.html#environment-variables"
    )
    return (
        " If reserved but unallocated memory is large try setting"
        f" {conf}=expandable_segments:True to avoid fragmentation.  See documentation for Memory"
        f" Management  ({url})"
    )


@dataclass
class SimDevice:
    """One simulated GPU: its allocator, what lives outside it, and its sticky state."""

    index: int
    cfg: SimConfig
    sim: SimulatedCuda
    allocator: CachingAllocator = field(init=False)
    context: bool = False
    outside: dict[str, int] = field(default_factory=dict)  # library memory outside the allocator
    cublas: dict[tuple[int, bool], Block] = field(default_factory=dict)  # workspaces per thread
    cudnn_workspace: dict[tuple[Any, ...], int] = field(default_factory=dict)  # benchmark's pick
    sticky: tuple[int, str, str] | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        self.allocator = CachingAllocator(room=self.room)

    # -- memory -----------------------------------------------------------------------------
    def used_outside_allocator(self) -> int:
        return (self.cfg.context_bytes if self.context else 0) + sum(self.outside.values())

    def room(self) -> int:
        """Free device memory for a new segment or library allocation."""
        return (
            self.cfg.total_bytes
            - self.used_outside_allocator()
            - self.allocator.reserved
            - self.sim.others(self.index)
        )

    def ensure_context(self) -> None:
        """The first CUDA call creates the context (outside the allocator)."""
        if self.context:
            return
        if self.room() < self.cfg.context_bytes:
            raise accelerator_error(*_OOM_CODE)
        self.context = True
        self.sim.publish(self)

    def check_sticky(self) -> None:
        if self.sticky is not None:
            raise accelerator_error(*self.sticky)

    def malloc(self, nbytes: int) -> Block:
        self.check_sticky()
        self.ensure_context()
        reserved = self.allocator.reserved
        try:
            block = self.allocator.malloc(nbytes)
        except SegmentRefused as refused:
            raise torch.OutOfMemoryError(self.oom_message(refused.alloc_size)) from None
        finally:
            if self.allocator.reserved != reserved:
                self.sim.publish(self)
        return block

    def free(self, block: Block) -> None:
        self.allocator.free(block)

    def take_outside(self, what: str, nbytes: int, error: Exception) -> None:
        """Library memory outside the allocator (handles, NCCL buffers); `error` when it fails."""
        self.ensure_context()
        if self.room() < nbytes:
            raise error
        self.outside[what] = self.outside.get(what, 0) + nbytes
        self.sim.publish(self)

    def give_outside(self, what: str, nbytes: int) -> None:
        self.outside[what] = max(0, self.outside.get(what, 0) - nbytes)
        self.sim.publish(self)

    def oom_message(self, alloc_size: int) -> str:
        a = self.allocator
        total = self.cfg.total_bytes
        free = max(0, self.room())
        own = self.used_outside_allocator() + a.reserved
        procs = f"Including non-PyTorch memory, this process has {format_size(own)} memory in use. "
        for pid, used in self.sim.other_processes(self.index):
            procs += f"Process {pid} has {format_size(used)} memory in use. "
        allowed = f"{format_size(a.cap_bytes)} allowed; " if a.cap_bytes is not None else ""
        return (
            f"CUDA out of memory. Tried to allocate {format_size(alloc_size)}. GPU {self.index} "
            f"has a total capacity of {format_size(total)} of which {format_size(free)} is free. "
            f"{procs}{allowed}Of the allocated memory {format_size(a.allocated)} is allocated by "
            f"PyTorch, and {format_size(a.reserved - a.allocated)} is reserved by PyTorch but "
            f"unallocated.{_oom_tail()}"
        )

    # -- libraries --------------------------------------------------------------------------
    def before_op(self, func: Any, args: tuple[Any, ...]) -> list[Block]:
        """What the library behind `func` allocates before the kernel runs; transient blocks
        are returned for freeing once it ran."""
        packet = func.overloadpacket
        if packet in _CUBLAS:
            self._cublas()
            self._scratch("cublas")
        elif packet in _CUDNN:
            return self._cudnn(args)
        elif packet in _CUFFT:
            self._scratch("cufft")
        elif str(packet) in self.cfg.raw_scratch_ops:
            self._scratch("raw")
        return []

    def _cublas(self) -> None:
        # a handle and workspace per (thread, stream): autograd runs backward on its own thread
        key = (threading.get_ident(), torch._C._current_autograd_node() is not None)
        if key in self.cublas:
            return
        error = RuntimeError(
            f"CUDA error: {self.cfg.cublas_create_error} when calling `cublasCreate(handle)`"
        )
        self.take_outside("cublas handles", self.cfg.cublas_handle_bytes, error)
        self.cublas[key] = self.malloc(self.cfg.workspace_bytes())

    def _cudnn(self, args: tuple[Any, ...]) -> list[Block]:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        limit = self.cfg.cudnn_unsupported_above
        if x is not None and limit is not None and x.numel() > limit:
            raise RuntimeError(
                "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in "
                "a non-contiguous input."
            )
        if "cudnn handle" not in self.outside:
            error = RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
            self.take_outside("cudnn handle", self.cfg.cudnn_handle_bytes, error)
        self._scratch("cudnn")
        benchmark = bool(torch.backends.cudnn.benchmark)
        shapes = tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
        key = (benchmark, *shapes)
        if key not in self.cudnn_workspace:
            # the fastest algorithms want a workspace of a few times the input; autotuning takes
            # the fastest whose workspace fits the memory free now, heuristics a modest one
            fastest = min(self.cfg.cudnn_max_workspace_bytes, 4 * x.nbytes if x is not None else 0)
            if benchmark:
                want = min(fastest, max(0, self.room()) // 2)
            else:
                want = min(fastest // 8, self.cfg.cudnn_default_workspace_bytes)
            self.cudnn_workspace[key] = want
        want = self.cudnn_workspace[key]
        while want >= 512:  # an algorithm needing less workspace when this one does not fit
            try:
                return [self.allocator.malloc(want)]
            except SegmentRefused:
                want //= 2
        return []

    def _scratch(self, library: str) -> None:
        need = self.cfg.library_scratch.get(library, 0)
        if need and self.room() < need:
            if library == "raw":
                raise accelerator_error(*_OOM_CODE)
            raise RuntimeError(self.cfg.library_error(library, torch.backends.cudnn.benchmark))

    # -- faults -----------------------------------------------------------------------------
    def fault(self, kind: str) -> RuntimeError:
        """Make the device sticky with `kind` and return the error the launch raised."""
        self.sticky = FAULTS[kind]
        return accelerator_error(*self.sticky)


class SimMode(TorchDispatchMode):
    """Feeds every op's output storages to the current simulated device, and lets it act
    around library calls. Fake and meta tensors (estimate's traces) are not device memory."""

    def __init__(self, sim: SimulatedCuda) -> None:
        super().__init__()
        self.sim = sim
        self._live: dict[int, Block] = {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if _is_fake(args, kwargs):
            return func(*args, **(kwargs or {}))
        dev = self.sim.devices[self.sim.current]
        dev.check_sticky()  # a launch on a poisoned context fails with its error
        transient = dev.before_op(func, args)
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            for block in transient:
                dev.free(block)
        from torch._subclasses.fake_tensor import FakeTensor

        for t in tree_flatten(out)[0]:
            # a fake tensor made from a meta one (a trace materialising its model) is no memory
            real = isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)
            if real and t.device.type != "meta":
                self._track(dev, t)
        return out

    def _track(self, dev: SimDevice, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key, nbytes = storage._cdata, storage.nbytes()
        block = self._live.get(key)
        if block is not None:
            if block.size >= nbytes:  # a view, or an in-place op on the same storage
                return
            dev.free(block)  # resized (out= ops, resize_): a new block
        elif nbytes == 0:
            return
        self._live[key] = dev.malloc(nbytes)
        if block is None:
            weakref.finalize(storage, self._release, dev, key)

    def _release(self, dev: SimDevice, key: int) -> None:
        block = self._live.pop(key, None)
        if block is not None and block.used:
            dev.free(block)


def _is_fake(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> bool:
    """An op on fake tensors, or on meta ones only: no device is involved."""
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    if any(isinstance(a, FakeTensor) for a in tensors):
        return True
    return bool(tensors) and all(a.device.type == "meta" for a in tensors)


@dataclass
class SimEvent:
    device: SimDevice
    at: float | None = None

    def record(self) -> None:
        self.device.check_sticky()
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        self.device.check_sticky()

    def elapsed_time(self, end: SimEvent) -> float:
        self.device.check_sticky()
        assert self.at is not None and end.at is not None
        return (end.at - self.at) * 1000.0


class SimulatedCuda(TorchCuda):
    """The CudaDriver of a simulated GPU (see the module docstring)."""

    simulated = True

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.devices = [SimDevice(i, cfg, self) for i in range(cfg.device_count)]
        self.current = 0
        self.mode = SimMode(self)
        self.collective_backend = cfg.collective_backend()

    # -- other processes on the same physical devices -----------------------------------------
    def _state_file(self, dev: SimDevice, owner: str) -> Path | None:
        if not self.cfg.state_dir:
            return None
        return Path(self.cfg.state_dir) / f"gpu{self.cfg.physical_id + dev.index}.{owner}"

    def publish(self, dev: SimDevice) -> None:
        """Tell other processes how much of this device this process holds."""
        path = self._state_file(dev, str(os.getpid()))
        if path is None:
            return
        used = dev.used_outside_allocator() + dev.allocator.reserved
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(str(used))
        os.replace(tmp, path)

    def other_processes(self, index: int) -> list[tuple[str, int]]:
        if not self.cfg.state_dir:
            return []
        out = []
        for path in Path(self.cfg.state_dir).glob(f"gpu{self.cfg.physical_id + index}.*"):
            owner = path.name.split(".", 1)[1]
            if owner == str(os.getpid()):
                continue
            if owner.isdigit() and not _alive(int(owner)):
                continue
            with contextlib.suppress(OSError, ValueError):
                out.append((owner, int(path.read_text())))
        return out

    def others(self, index: int) -> int:
        return sum(used for _, used in self.other_processes(index))

    def occupy(self, nbytes: int, owner: str = "tenant", index: int = 0) -> None:
        """Another process takes `nbytes` of device `index` (0 gives it back)."""
        assert self.cfg.state_dir, "occupying memory needs a state_dir"
        dev = self.devices[index]
        path = self._state_file(dev, owner)
        assert path is not None
        path.write_text(str(nbytes))

    # -- the driver -------------------------------------------------------------------------
    def _dev(self, index: int) -> SimDevice:
        dev = self.devices[index]
        if self.cfg.sticky_stats_raise:
            dev.check_sticky()
        return dev

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.cfg.device_count

    def current_device(self) -> int:
        return self.current

    def tensor_device(self, index: int) -> torch.device:
        return torch.device("cpu")

    def set_device(self, index: int) -> None:
        if not 0 <= index < self.cfg.device_count:
            raise accelerator_error(101, "cudaErrorInvalidDevice", "invalid device ordinal")
        self.current = index
        self.devices[index].ensure_context()

    def properties(self, index: int) -> DeviceProps:
        major, minor = self.cfg.capability
        return DeviceProps(f"{self.cfg.name} (simulated)", major, minor, self.cfg.multiprocessors)

    def mem_get_info(self, index: int) -> tuple[int, int]:
        dev = self.devices[index]
        dev.check_sticky()
        dev.ensure_context()
        return max(0, dev.room()), self.cfg.total_bytes

    def set_memory_fraction(self, fraction: float, index: int) -> None:
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        dev = self.devices[index]
        dev.allocator.cap_bytes = int(fraction * self.cfg.total_bytes)

    def memory_allocated(self, index: int) -> int:
        return self._dev(index).allocator.allocated

    def memory_reserved(self, index: int) -> int:
        return self._dev(index).allocator.reserved

    def max_memory_allocated(self, index: int) -> int:
        return self._dev(index).allocator.peak_allocated

    def max_memory_reserved(self, index: int) -> int:
        return self._dev(index).allocator.peak_reserved

    def reset_peak_memory_stats(self, index: int) -> None:
        self._dev(index).allocator.reset_peaks()

    def memory_stats(self, index: int) -> dict[str, Any]:
        a = self._dev(index).allocator
        return {
            "allocated_bytes.all.current": a.allocated,
            "allocated_bytes.all.peak": a.peak_allocated,
            "reserved_bytes.all.current": a.reserved,
            "reserved_bytes.all.peak": a.peak_reserved,
            "num_alloc_retries": a.num_alloc_retries,
            "num_ooms": a.num_ooms,
        }

    def synchronize(self, index: int) -> None:
        self.devices[index].check_sticky()

    def empty_cache(self) -> None:
        for dev in self.devices:
            dev.check_sticky()
            if dev.allocator.release_cached():
                self.publish(dev)

    def event(self) -> SimEvent:
        return SimEvent(self.devices[self.current])

    def versions(self) -> dict[str, Any]:
        return {"cuda": "12.8 (simulated)", "hip": None, "cudnn": 91000}

    def fault(self, kind: str) -> RuntimeError:
        """A kernel on the current device fails with a sticky error: returns the exception to
        raise (the device stays poisoned)."""
        return self.devices[self.current].fault(kind)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
