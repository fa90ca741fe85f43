"""Device backends, chosen once by name: `get_backend("auto" | "cpu" | "cuda" | "cuda:N")`."""

from __future__ import annotations

import torch

from batchprobe.backends.base import Backend, DeviceInfo, Meter
from batchprobe.errors import DeviceError

__all__ = ["Backend", "DeviceInfo", "Meter", "get_backend", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when present, else cpu. Raises DeviceError (exit 3) for a missing device."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} was requested but no CUDA device is available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
                "Use --device cpu, or install a CUDA build of torch."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found"
            )
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported yet; use cpu or cuda")
    return device


def get_backend(name: str, local_rank: int | None = None) -> Backend:
    """The backend for a device name; under torchrun (`local_rank`), auto/cuda mean this rank's
    GPU, cuda:LOCAL_RANK."""
    device = resolve_device(name)
    if local_rank is not None and device.type == "cuda" and device.index is None:
        device = resolve_device(f"cuda:{local_rank}")
    if device.type == "cuda":
        from batchprobe.backends.cuda import CudaBackend

        return CudaBackend(device)
    from batchprobe.backends.cpu import CpuBackend

    return CpuBackend()


def describe_environment() -> dict[str, object]:
    """What `batchprobe env` shows: devices, memory, versions, allocator settings."""
    import importlib.metadata
    import os
    import platform

    from batchprobe.backends.cpu import available_ram_bytes, cpu_name

    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "ram_available_bytes": available_ram_bytes(),
        "cuda_available": torch.cuda.is_available(),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
    }
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
        info["cudnn"] = torch.backends.cudnn.version()
    info["cuda_devices"] = devices
    packages: dict[str, str | None] = {}
    for name in ("transformers", "torchvision", "timm", "matplotlib", "typer", "rich"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    return info
