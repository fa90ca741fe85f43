"""NCCL, simulated: gloo moves the bytes; what NCCL does to a job around them is modelled.

- A communicator takes its buffers from the device at its first collective (lazily, as NCCL
  does without `device_id`), outside PyTorch's allocator, and gives them back only when its
  process group is destroyed. When they do not fit, the collective fails as NCCL does
  (`DistBackendError`: "unhandled cuda error ... Cuda failure 'out of memory'").
- A collective that does not complete within the group's timeout: ProcessGroupNCCL's watchdog
  acts as `TORCH_NCCL_ASYNC_ERROR_HANDLING` (read when the group is made) says — 1 (TearDown) and
  3 (SkipCleanUp, the default in torch 2.4-2.14) log the watchdog's lines and take the whole
  process down (SIGABRT); 2 (CleanUpOnly) aborts the communicator and the waiting rank's
  collective raises; 0 does nothing.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from batchprobe.backends.simcuda.allocator import format_size

NAME = "batchprobe_simnccl"
_DEFAULT_ERROR_HANDLING = 3  # SkipCleanUp: torch 2.4-2.14's default
_registered = False


def _release(held: dict[str, int]) -> None:
    if not held["bytes"]:
        return
    from batchprobe.backends import simcuda

    if simcuda.active():
        device = simcuda.current()
        device.devices[device.current].give_outside("nccl buffers", held["bytes"])
    held["bytes"] = 0


def register() -> None:
    global _registered
    if not _registered:
        dist.Backend.register_backend(NAME, SimNccl.create, devices=["cpu"])
        _registered = True


class SimNccl(dist.ProcessGroup):
    @classmethod
    def create(cls, store: Any, rank: int, size: int, timeout: timedelta) -> SimNccl:
        return cls(store, rank, size, timeout)

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)  # type: ignore[call-arg]  # the Python-group constructor
        self.inner = dist.ProcessGroupGloo(store, rank, size, timeout)
        self.timeout = timeout
        self.mode = int(os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", _DEFAULT_ERROR_HANDLING))
        # the communicator's buffers, given back at shutdown — which torch < 2.14 calls on real
        # NCCL groups only — or when the group is gone
        self.held = {"bytes": 0}
        weakref.finalize(self, _release, self.held)
        self.aborted = False
        self.seq = 0
        self._name = ""

    # -- the group's identity ---------------------------------------------------------------
    def getBackendName(self) -> str:
        return NAME

    def _set_group_name(self, name: str) -> None:
        self._name = name

    @property
    def group_name(self) -> Any:  # torch types it as its own GroupName
        return self._name

    def size(self) -> int:
        return int(self.inner.size())

    def rank(self) -> int:
        return int(self.inner.rank())

    def shutdown(self) -> None:
        """Destroying the group frees its communicator's buffers."""
        _release(self.held)

    # -- collectives ------------------------------------------------------------------------
    def _run(self, name: str, *args: Any) -> Any:
        if self.aborted:
            raise dist.DistBackendError(f"NCCL communicator was aborted on rank {self.rank()}.")
        self._ensure_communicator()
        self.seq += 1
        work = getattr(self.inner, name)(*args)
        work.get_future().then(lambda fut, seq=self.seq, op=name: self._watchdog(fut, seq, op))
        return work

    def _ensure_communicator(self) -> None:
        if self.held["bytes"]:
            return
        from batchprobe.backends import simcuda

        device = simcuda.current()
        need = device.cfg.nccl_buffer_bytes
        error = dist.DistBackendError(
            "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled "
            "cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.26.2\n"
            "ncclUnhandledCudaError: Call to CUDA function failed.\n"
            f"Last error:\nCuda failure 'out of memory' (allocating {format_size(need)})"
        )
        device.devices[device.current].take_outside("nccl buffers", need, error)
        self.held["bytes"] = need

    def _watchdog(self, fut: torch.futures.Future[Any], seq: int, op: str) -> Any:
        try:
            return fut.value()
        except Exception:
            if self.mode in (1, 3):  # TearDown, SkipCleanUp: the process goes down
                ms = int(self.timeout.total_seconds() * 1000)
                rank = self.rank()
                sys.stderr.write(
                    f"[rank{rank}]:[E ProcessGroupNCCL.cpp] [Rank {rank}] Watchdog caught "
                    f"collective operation timeout: WorkNCCL(SeqNum={seq}, OpType={op.upper()}, "
                    f"Timeout(ms)={ms}) ran for {ms} milliseconds before timing out.\n"
                    f"[rank{rank}]:[E ProcessGroupNCCL.cpp] [Rank {rank}] Some NCCL operations "
                    "have failed or timed out. Due to the asynchronous nature of CUDA kernels, "
                    "subsequent GPU operations might run on corrupted/incomplete data.\n"
                    f"[rank{rank}]:[E ProcessGroupNCCL.cpp] [Rank {rank}] To avoid data "
                    "inconsistency, we are taking the entire process down.\n"
                )
                sys.stderr.flush()
                threading.Thread(target=os.abort, daemon=True).start()
            elif self.mode == 2:  # CleanUpOnly: the communicator is aborted, the error raised
                self.aborted = True
            raise

    def allreduce(self, *args: Any) -> Any:
        return self._run("allreduce", *args)

    def allreduce_coalesced(self, *args: Any) -> Any:
        return self._run("allreduce_coalesced", *args)

    def broadcast(self, *args: Any) -> Any:
        return self._run("broadcast", *args)

    def allgather(self, *args: Any) -> Any:
        return self._run("allgather", *args)

    def _allgather_base(self, *args: Any) -> Any:
        return self._run("_allgather_base", *args)

    def all_gather_single(self, *args: Any) -> Any:
        return self._run("_allgather_base", *args)

    def reduce_scatter(self, *args: Any) -> Any:
        return self._run("reduce_scatter", *args)

    def _reduce_scatter_base(self, *args: Any) -> Any:
        return self._run("_reduce_scatter_base", *args)

    def reduce_scatter_single(self, *args: Any) -> Any:
        return self._run("_reduce_scatter_base", *args)

    def barrier(self, *args: Any) -> Any:
        return self._run("barrier", *args)
