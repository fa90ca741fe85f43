"""Live tensor bytes, counted per storage, and the budget that turns them into real OOMs.

`StorageLedger` records every tensor storage an op produces (through a TorchDispatchMode, which
also sees the ops the C++ autograd engine runs during backward) and forgets it when the storage is
freed (`weakref.finalize` on the storage). Its peak is the quantity torch's own memory tracker
reports: parameters, gradients, optimizer state, activations and temporaries. With a budget, the op
that takes live bytes over it raises `torch.OutOfMemoryError`, exactly the exception a GPU raises.

The same ledger runs under FakeTensorMode for `estimate`: no compute, no memory, same figures.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from batchprobe.results import Breakdown, PeakBreakdown, TensorAtPeak
from batchprobe.units import format_bytes

_PHASE_TAG = {"forward": "activations"}  # what a storage created in a phase counts as by default


@dataclass
class _Record:
    nbytes: int
    tag: str
    finalizer: weakref.finalize | None = None
    # what made it (an explaining ledger only)
    op: str = ""
    shape: tuple[int, ...] = ()
    dtype: str = ""
    module: str = ""
    order: int = 0  # when it was made, among the region's storages


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
    #: called when that first failure is the op's own (not the budget's), while its inputs are
    #: still alive: a backend reads what the host counted then
    on_failure: Callable[[], object] | None = None
    #: bytes each op's outputs took, summed over the region (when asked for)
    by_op: dict[str, int] | None = None
    #: an explaining ledger notes what made each storage (op, shape, dtype, module) and keeps
    #: the storages live at the peak: `explain()`
    scope: ModuleScope | None = None
    #: the memory timeline: (phase, live bytes by kind) after each op that changed them
    timeline: list[tuple[str, dict[str, int]]] | None = None
    _by_tag: dict[str, int] = field(default_factory=dict)
    _made: Iterator[int] = field(default_factory=itertools.count)

    # -- recording ------------------------------------------------------------------------
    def see(
        self,
        t: torch.Tensor,
        tag: str | None = None,
        enforce: bool = True,
        op: str = "",
        module: str | None = None,
    ) -> None:
        found = _storage_key(t)
        if found is None:
            return
        key, storage = found
        nbytes = _round_up(storage.nbytes(), self.round_to)
        record = self._live.get(key)
        if record is not None:
            if record.nbytes != nbytes:  # resized in place (out= ops, resize_)
                self._count(record.tag, nbytes - record.nbytes)
                self.live_bytes += nbytes - record.nbytes
                record.nbytes = nbytes
                self._after_growth(nbytes, enforce)
            if tag is not None and tag != record.tag:
                self._count(record.tag, -record.nbytes)
                self._count(tag, record.nbytes)
                record.tag = tag
            return
        record = _Record(nbytes, tag or _PHASE_TAG.get(self.current_phase, "other"))
        if self.scope is not None:
            record.op, record.shape, record.dtype = op, tuple(t.shape), str(t.dtype)[6:]
            record.module = module or self.scope.current(self.current_phase)
            record.order = next(self._made)
        record.finalizer = weakref.finalize(storage, self._forget, key)
        self._live[key] = record
        self._count(record.tag, nbytes)
        self.live_bytes += nbytes
        self._after_growth(nbytes, enforce)

    def origin(self, args: Any) -> str | None:
        """The module that made the latest forward tensor (activation or parameter) among an
        op's arguments: whose backward a backward op is part of."""
        best: _Record | None = None
        for a in tree_flatten(args)[0]:
            found = _storage_key(a) if isinstance(a, torch.Tensor) else None
            record = self._live.get(found[0]) if found is not None else None
            if record is None or record.tag not in ("activations", "parameters"):
                continue
            if best is None or record.order > best.order:
                best = record
        return best.module if best is not None else None

    def _count(self, tag: str, nbytes: int) -> None:
        if self.timeline is not None:
            self._by_tag[tag] = self._by_tag.get(tag, 0) + nbytes

    def tick(self) -> None:
        """An op ended: a point on the timeline (when one is kept) if live bytes changed."""
        if self.timeline is None:
            return
        point = (self.current_phase, {k: v for k, v in self._by_tag.items() if v})
        if not self.timeline or self.timeline[-1] != point:
            self.timeline.append(point)

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
        self._count(record.tag, -record.nbytes)
        if self._peak_pending and (self.keep_breakdown or self.scope is not None):
            # live bytes only grew since the last peak: the peak's contents are what is live now
            self._peak_records = [*self._live.values(), record]
            self._peak_pending = False
        self.live_bytes -= record.nbytes

    def region(self, name: str) -> None:
        """Storages made outside any module from now on are this region's: (loss)."""
        if self.scope is not None:
            self.scope.region = name

    def phase(self, name: str) -> None:
        """Storages created from now on count as this phase's (forward: activations)."""
        if self.scope is not None and name in ("forward", "optimizer"):
            self.scope.region = ""  # the loss's region lasts through its backward
        self.current_phase = name
        if self.live_bytes > self.phase_peaks.get(name, 0):
            self.phase_peaks[name] = self.live_bytes

    def mark(self, tensors: Iterable[torch.Tensor], tag: str) -> None:
        """Register tensors created outside the ledger's view, or re-categorise known ones.
        Never raises: if they alone exceed the budget, the next allocation does. An explaining
        ledger names gradients and parameters by the module that owns the parameter, and
        optimizer state (optimizer)."""
        for t in tensors:
            self.see(t, tag, enforce=False)
        if self.scope is not None:
            self.scope.own(self._live, tag)

    # -- results --------------------------------------------------------------------------
    def breakdown(self) -> Breakdown:
        if self._peak_pending:
            self._peak_records = list(self._live.values())
            self._peak_pending = False
        out = Breakdown()
        for r in self._peak_records:
            setattr(out, r.tag, getattr(out, r.tag) + r.nbytes)
        return out

    def explain(self, batch_size: int, source: Literal["measured", "traced"]) -> PeakBreakdown:
        """The storages live at the peak, by module, and the largest of them (an explaining
        ledger: `scope` set)."""
        self.breakdown()  # settles the peak's records
        return PeakBreakdown.of(
            (
                TensorAtPeak(r.nbytes, r.shape, r.dtype, r.op or "?", r.module or "?", r.tag)
                for r in self._peak_records
            ),
            batch_size,
            source,
        )

    def close(self) -> None:
        """Stop watching the storages still alive (their finalizers would keep us alive)."""
        for record in self._live.values():
            if record.finalizer is not None:
                record.finalizer.detach()
        self._live.clear()


class ModuleScope:
    """Which module is running when a storage is made, named by its path in the model
    (`transformer.h.3.mlp.c_fc`; the model's own forward outside its submodules by its class;
    outside the model, the step's region or phase: (loss), (optimizer), (batch)).

    Forward: a stack kept by global forward hooks. Backward (the autograd engine runs no
    module hooks): the module that made the forward tensors the op reads — the activation it
    saved, the weight — latest first (`StorageLedger.origin`). Nothing is hooked on tensors:
    torch's ModuleTracker does that, and under activation checkpointing its hooks hold the
    recomputed graph until the region ends, which would change the very peak being explained.
    Used as a context manager around the tracked region."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.root = type(model).__name__
        self.names = {id(m): name or self.root for name, m in model.named_modules()}
        self.params = [
            (name or self.root, param)
            for name, module in model.named_modules()
            for param in module.parameters(recurse=False)
        ]
        self.region = ""
        self._stack: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleScope:
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )

        def enter(module: torch.nn.Module, args: Any) -> None:
            self._stack.append(self.names.get(id(module), type(module).__name__))

        def leave(module: torch.nn.Module, args: Any, out: Any) -> None:
            if self._stack:
                self._stack.pop()

        self._handles = [
            register_module_forward_pre_hook(enter),
            register_module_forward_hook(leave, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def in_module(self) -> bool:
        """A module's forward is running (in backward too: a checkpoint's recomputation)."""
        return bool(self._stack)

    def current(self, phase: str) -> str:
        if self._stack:
            return self._stack[-1]
        return f"({self.region or phase})"

    def own(self, live: dict[int, _Record], tag: str) -> None:
        """Parameters and their gradients belong to the module that holds the parameter."""
        if tag not in ("parameters", "gradients"):
            return
        named: set[int] = set()
        for name, param in self.params:  # a tied parameter is its first holder's
            t = param if tag == "parameters" else param.grad
            found = _storage_key(t) if t is not None else None
            if found is None or found[0] in named or found[0] not in live:
                continue
            named.add(found[0])
            live[found[0]].module = name


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
        except Exception:  # the op itself failed (its allocator, a library): the ledger saw none
            if ledger.failed is None:
                ledger.failed = (_op_name(func), before, None)
                if ledger.on_failure is not None:
                    with contextlib.suppress(Exception):  # never instead of the op's own error
                        ledger.on_failure()
            raise
        try:
            name, module = "", None
            if ledger.scope is not None:
                name = _op_name(func)
                if ledger.current_phase == "backward" and not ledger.scope.in_module:
                    module = ledger.origin(args)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    ledger.see(t, op=name, module=module)
        except Exception:  # over the budget: the ledger saw what the op made
            if ledger.failed is None:
                request = ledger.live_bytes - before if ledger.live_bytes > before else None
                ledger.failed = (_op_name(func), before, request)
            raise
        if ledger.by_op is not None and ledger.live_bytes > before:
            name = name or _op_name(func)
            ledger.by_op[name] = ledger.by_op.get(name, 0) + ledger.live_bytes - before
        ledger.tick()
        return out


def _op_name(func: Any) -> str:
    """aten.mkldnn_rnn_layer.default -> mkldnn_rnn_layer"""
    name = str(getattr(func, "__name__", func))
    return name.split(".")[0] if name.count(".") else name
