"""A simulated CUDA device, for running the CUDA backend's control flow where there is no GPU:
CI, laptops, and the tests of everything batchprobe does on a GPU.

Set `BATCHPROBE_SIMULATE_CUDA=1` (or a JSON object of `SimConfig` fields, e.g.
`{"total_bytes": "24GiB", "capability": [8, 6]}`) and `--device cuda` opens the simulated GPU in
this process and in every child it starts (isolated probes, torchrun ranks). Its device name ends
in "(simulated)", so no figure it produces can pass for a measurement of real hardware.

In Python: `with simulated_cuda(total_bytes=...) as sim:`; `sim.occupy(...)` plays another process
taking memory; `fault("illegal-address")` returns the error a failing kernel raises and leaves the
device sticky.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batchprobe.backends.cudadriver import SIMULATE_ENV
from batchprobe.backends.simcuda.config import SimConfig
from batchprobe.backends.simcuda.device import SimulatedCuda

__all__ = ["SimConfig", "SimulatedCuda", "current", "fault", "simulated_cuda"]

_current: SimulatedCuda | None = None


def current() -> SimulatedCuda:
    """This process's simulated GPU, made from BATCHPROBE_SIMULATE_CUDA on first use; from then
    on every tensor this thread makes lives in its memory."""
    global _current
    if _current is None:
        sim = SimulatedCuda(SimConfig.from_json(os.environ[SIMULATE_ENV]))
        sim.mode.__enter__()
        _current = sim
        if sim.cfg.collectives == "nccl":
            from batchprobe.backends.simcuda.nccl import register

            register()
    return _current


def active() -> bool:
    """Whether this process has a simulated GPU now."""
    return _current is not None


def _reset() -> None:
    global _current
    if _current is not None:
        _current.mode.__exit__(None, None, None)
        _current = None


@contextmanager
def simulated_cuda(**settings: Any) -> Iterator[SimulatedCuda]:
    """The simulated GPU for the duration of the block (and for the children started in it)."""
    cfg = SimConfig(**settings)
    saved = os.environ.get(SIMULATE_ENV)
    _reset()
    os.environ[SIMULATE_ENV] = cfg.to_json()
    try:
        yield current()
    finally:
        _reset()
        if saved is None:
            os.environ.pop(SIMULATE_ENV, None)
        else:
            os.environ[SIMULATE_ENV] = saved


def fault(kind: str) -> RuntimeError:
    """The error a kernel raises on the simulated GPU when it hits `kind` (illegal-address,
    assert, launch-failure); the device stays sticky."""
    return current().fault(kind)
