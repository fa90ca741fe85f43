"""Device backends: the only device-specific code in batchprobe, chosen once by name.

`REGISTRY` lists the backends: the device type each answers for, the names it accepts and the
module that holds its class (imported on first use, so reading the registry — spec validation,
`--help` — costs no torch import). `auto` is the first registered accelerator that is present,
else the CPU.

To add a backend (XPU, MPS, ...): one module with a class `BACKEND` implementing
`base.Backend` (per device) and `base.BackendType` (class methods), and one `Entry` here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from batchprobe.errors import DeviceError

if TYPE_CHECKING:
    from batchprobe.backends.base import Backend, BackendType


@dataclass(frozen=True)
class Entry:
    type: str  # the torch device type: cuda, cpu
    pattern: str  # device names it accepts (a regular expression)
    names: str  # the same, for people: "cuda · cuda:N"
    module: str  # where its BACKEND class lives
    accelerator: bool  # a GPU-class device (what --require-gpu asks for)


REGISTRY: tuple[Entry, ...] = (
    Entry("cuda", r"cuda(:\d+)?", "cuda · cuda:N", "batchprobe.backends.cuda", accelerator=True),
    Entry("cpu", r"cpu", "cpu", "batchprobe.backends.cpu", accelerator=False),
)


def device_help() -> str:
    """The device names for --device help and spec docs."""
    return " · ".join(["auto", *(e.names for e in REGISTRY)])


def is_device_name(name: str) -> bool:
    name = name.strip().lower()
    return name == "auto" or any(re.fullmatch(e.pattern, name) for e in REGISTRY)


def entry(device_type: str) -> Entry:
    found = next((e for e in REGISTRY if e.type == device_type), None)
    if found is None:
        supported = ", ".join(e.type for e in REGISTRY)
        raise DeviceError(f"device type {device_type!r} is not supported yet; use {supported}")
    return found


def backend_class(device_type: str) -> BackendType:
    return cast("BackendType", importlib.import_module(entry(device_type).module).BACKEND)


def resolve(name: str) -> tuple[Entry, int | None]:
    """(entry, device index) for a device name: 'auto' is the first accelerator present, else
    the CPU. Raises DeviceError (exit 3) for a device that is not here."""
    name = name.strip().lower()
    if name == "auto":
        for e in REGISTRY:
            if e.accelerator and backend_class(e.type).is_available():
                return e, None
        return entry("cpu"), None
    device_type, _, index_text = name.partition(":")
    found = entry(device_type)
    if not re.fullmatch(found.pattern, name):
        raise DeviceError(f"unknown device {name!r}; use {device_help()}")
    cls = backend_class(found.type)
    if not cls.is_available():
        raise DeviceError(cls.unavailable(name))
    index = int(index_text) if index_text else None
    if index is not None and index >= cls.device_count():
        raise DeviceError(
            f"device {name!r} does not exist: {cls.device_count()} {found.type} device(s) found"
        )
    return found, index


def get_backend(name: str, local_rank: int | None = None) -> Backend:
    """The backend for a device name; under torchrun (`local_rank`), a device type without an
    index means this rank's device."""
    found, index = resolve(name)
    return backend_class(found.type)(index, local_rank)


def is_accelerator(name: str) -> bool:
    """Whether the device `name` resolves to here is an accelerator (--require-gpu)."""
    return resolve(name)[0].accelerator


def describe_environment() -> dict[str, object]:
    """What `batchprobe env` shows: versions, then each backend's devices and settings."""
    import importlib.metadata
    import os
    import platform

    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
    }
    for e in reversed(REGISTRY):  # the CPU first, then the accelerators
        info.update(backend_class(e.type).describe())
    packages: dict[str, str | None] = {}
    for name in ("transformers", "torchvision", "timm", "matplotlib", "typer", "rich"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    return info
