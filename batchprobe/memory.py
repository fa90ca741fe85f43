"""Live tensor bytes, counted per storage, and the budget that turns them into real OOMs.

`StorageLedger` records every tensor storage an op produces (through a TorchDispatchMode, which
also sees the ops the C++ autograd engine runs during backward) and forgets it when the storage is
freed (`weakref.finalize` on the storage). Its peak is the quantity torch's own memory tracker
reports: parameters, gradients, optimizer state, activations and temporaries. With a budget, the op
that takes live bytes over it raises `torch.OutOfMemoryError`, exactly the exception a GPU raises.

The same ledger runs under FakeTensorMode for `estimate`: no compute, no memory, same figures.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from batchprobe.results import Breakdown
from batchprobe.units import format_bytes

_PHASE_TAG = {"forward": "activations"}  # what a storage created in a phase counts as by default


@dataclass
class _Record:
    nbytes: int
    tag: str
    finalizer: weakref.finalize | None = None


def _storage_key(t: torch.Tensor) -> tuple[int, torch.UntypedStorage] | None:
    local = getattr(t, "_local_tensor", None)  # a DTensor (FSDP2): its shard holds the storage
    if isinstance(local, torch.Tensor):
        t = local
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return None
    return storage._cdata, storage


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


@dataclass
class StorageLedger:
    """Live bytes of the storages it has seen; peak, budget and (optionally) the peak's breakdown."""

    budget_bytes: int | None = None
    round_to: int = 1  # CUDA's caching allocator rounds every block up to 512 bytes
    keep_breakdown: bool = False
    live_bytes: int = 0
    peak_bytes: int = 0
    current_phase: str = "other"
    phase_peaks: dict[str, int] = field(default_factory=dict)  # peak live bytes within each phase
    _live: dict[int, _Record] = field(default_factory=dict)
    _peak_pending: bool = False
    _peak_records: list[_Record] = field(default_factory=list)
    #: the first op that failed (ran out of memory or over the budget): its name, the bytes
    #: live before it, and what it asked for when the ledger saw it (the budget's check)
    failed: tuple[str, int, int | None] | None = None
    #: bytes each op's outputs took, summed over the region (when asked for)
    by_op: dict[str, int] | None = None

    # -- recording ------------------------------------------------------------------------
    def see(self, t: torch.Tensor, tag: str | None = None, enforce: bool = True) -> None:
        found = _storage_key(t)
        if found is None:
            return
        key, storage = found
        nbytes = _round_up(storage.nbytes(), self.round_to)
        record = self._live.get(key)
        if record is not None:
            if record.nbytes != nbytes:  # resized in place (out= ops, resize_)
                self.live_bytes += nbytes - record.nbytes
                record.nbytes = nbytes
                self._after_growth(nbytes, enforce)
            if tag is not None:
                record.tag = tag
            return
        record = _Record(nbytes, tag or _PHASE_TAG.get(self.current_phase, "other"))
        record.finalizer = weakref.finalize(storage, self._forget, key)
        self._live[key] = record
        self.live_bytes += nbytes
        self._after_growth(nbytes, enforce)

    def _after_growth(self, nbytes: int, enforce: bool) -> None:
        phase = self.current_phase
        if self.live_bytes > self.phase_peaks.get(phase, 0):
            self.phase_peaks[phase] = self.live_bytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._peak_pending = True
        over = self.budget_bytes is not None and self.live_bytes > self.budget_bytes
        if over and enforce and nbytes > 0:
            raise torch.OutOfMemoryError(
                f"CPU out of memory (batchprobe budget): tried to allocate {format_bytes(nbytes)}; "
                f"{format_bytes(self.live_bytes - nbytes)} of the {format_bytes(self.budget_bytes)} "
                "budget already in use by live tensors."
            )

    def _forget(self, key: int) -> None:
        record = self._live.pop(key, None)
        if record is None:
            return
        if self._peak_pending and self.keep_breakdown:
            # live bytes only grew since the last peak: the peak's contents are what is live now
            self._peak_records = [*self._live.values(), record]
            self._peak_pending = False
        self.live_bytes -= record.nbytes

    def phase(self, name: str) -> None:
        """Storages created from now on count as this phase's (forward: activations)."""
        self.current_phase = name
        if self.live_bytes > self.phase_peaks.get(name, 0):
            self.phase_peaks[name] = self.live_bytes

    def mark(self, tensors: Iterable[torch.Tensor], tag: str) -> None:
        """Register tensors created outside the ledger's view, or re-categorise known ones.
        Never raises: if they alone exceed the budget, the next allocation does."""
        for t in tensors:
            self.see(t, tag, enforce=False)

    # -- results --------------------------------------------------------------------------
    def breakdown(self) -> Breakdown:
        if self._peak_pending:
            self._peak_records = list(self._live.values())
            self._peak_pending = False
        out = Breakdown()
        for r in self._peak_records:
            setattr(out, r.tag, getattr(out, r.tag) + r.nbytes)
        return out

    def close(self) -> None:
        """Stop watching the storages still alive (their finalizers would keep us alive)."""
        for record in self._live.values():
            if record.finalizer is not None:
                record.finalizer.detach()
        self._live.clear()


class OutOfTime(Exception):
    """A tracked region ran past its deadline (a trace that costs more than it saves)."""


class TrackingMode(TorchDispatchMode):
    """Feeds every op's output tensors to a ledger (forward, backward and optimizer alike).
    With a `deadline` (time.perf_counter), the first op after it raises OutOfTime."""

    def __init__(self, ledger: StorageLedger, deadline: float | None = None) -> None:
        super().__init__()
        self.ledger = ledger
        self.deadline = deadline

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise OutOfTime
        ledger = self.ledger
        before = ledger.live_bytes
        try:
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    ledger.see(t)
        except Exception:
            if ledger.failed is None:
                request = ledger.live_bytes - before if ledger.live_bytes > before else None
                ledger.failed = (_op_name(func), before, request)
            raise
        if ledger.by_op is not None and ledger.live_bytes > before:
            name = _op_name(func)
            ledger.by_op[name] = ledger.by_op.get(name, 0) + ledger.live_bytes - before
        return out


def _op_name(func: Any) -> str:
    """aten.mkldnn_rnn_layer.default -> mkldnn_rnn_layer"""
    name = str(getattr(func, "__name__", func))
    return name.split(".")[0] if name.count(".") else name
