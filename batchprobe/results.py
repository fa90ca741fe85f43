"""What every command returns: plain data, no torch. `report` renders these; flows produce them.

Sizes are bytes, times seconds. A failed probe keeps only its exception's type name, message and
formatted traceback (never the exception: its frames pin the activations).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from batchprobe.planning import UNSTABLE_SPREAD, Plan
from batchprobe.schedstat import busy
from batchprobe.search import Observation, Outcome, SearchResult
from batchprobe.units import format_bytes

#: how a probe failed: the memory system that ran out, or why it was not memory
FailureKind = Literal[
    "budget",  # the CPU backend's budget (the storage ledger)
    "allocator",  # a caching allocator: CUDA/HIP/XPU/MPS out of memory
    "cuda-runtime",  # raw CUDA OOM outside the allocator (context, library handles)
    "hip-runtime",
    "cublas",  # cuBLAS workspace / handle allocation
    "cudnn",  # cuDNN workspace allocation, or a large-batch kernel it cannot run
    "cufft",
    "unsupported",  # CUDNN_STATUS_NOT_SUPPORTED: too large for the kernel (an error at batch 1)
    "host",  # the host allocator (RAM)
    "other",  # some other "out of memory"
    "thrash",  # allocator retries in consecutive steps: completes, on the edge
    "killed",  # an isolated child killed by SIGKILL (the OS OOM killer)
    "timeout",  # an isolated child that did not answer in time
    "sticky",  # a sticky device error: the process's context is gone
    "limit",  # a batch limit that is not memory (32-bit indexing, launch configuration)
    "error",  # a bug in the model or spec
    "crash",  # an isolated child that died without a result
]


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Failure:
    outcome: Outcome
    kind: FailureKind
    error_type: str
    message: str
    traceback: str | None = None

    @property
    def sticky(self) -> bool:
        return self.kind == "sticky"

    def to_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome.value,
            "kind": self.kind,
            "error_type": self.error_type,
            "message": self.message,
            "traceback": self.traceback,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Failure:
        return cls(Outcome(d["outcome"]), d["kind"], d["error_type"], d["message"], d["traceback"])


@dataclass(frozen=True)
class ProbeResult:
    batch_size: int
    outcome: Outcome
    peak_bytes: int | None
    seconds: float
    reserved_bytes: int | None = None
    retained_bytes: int = 0  # still held after recovery: should be 0
    alloc_retries: int = 0
    failure: Failure | None = None
    reused: bool = False  # answered from an earlier probe's measured peak, not run again
    line_bytes: int | None = None  # peak of forward/backward alone (grows with the batch)
    flat_bytes: int | None = None  # peak of the optimizer step alone (nearly flat)
    isolated: bool = False  # ran in a child process
    #: the failed allocation: bytes live when it failed (the limit is at least this), live plus
    #: the request (memory at this size is at least this), and the op that asked, when known
    live_bytes: int | None = None
    need_bytes: int | None = None
    failed_op: str | None = None
    #: the limit the next probe faces, as the device knew it after this one (the CPU: its
    #: budget, or under an rlimit the limit as it moves), and whether it moves with what the
    #: probes themselves map (an rlimit) rather than because the limit changed
    limit_after_bytes: int | None = None
    limit_moves_with_probes: bool = False
    #: bytes each op's outputs took over the probe (the CPU's ledger sees ops; CUDA does not)
    op_bytes: dict[str, int] | None = field(default=None, repr=False)
    #: what filled the peak (a completed probe on a backend that sees each storage)
    explained: PeakBreakdown | None = field(default=None, repr=False, compare=False)

    def observation(self, limit_bytes: int | None = None) -> Observation:
        """What a search is told. Against `limit_bytes` (a limit below the one the probe ran
        under, e.g. plan's headroom), a completed probe whose peak is above it did not fit."""
        moving, own = self.limit_after_bytes, self.limit_moves_with_probes
        if self.outcome is not Outcome.FIT:
            # what a caching allocator held when it failed is no floor on the peaks that fit:
            # its free blocks may sit in segments no request of the size fits in (a simulated
            # GPU's search walked down from it, 23 probes where doubling took 25)
            caching = self.failure is not None and self.failure.kind == "allocator"
            return Observation(
                self.outcome,
                live_bytes=None if caching else self.live_bytes,
                need_bytes=self.need_bytes,
                limit_bytes=moving,
                limit_moves_with_probes=own,
            )
        if (
            limit_bytes is not None
            and self.peak_bytes is not None
            and self.peak_bytes > limit_bytes
        ):
            # it completed: its peak is exactly what this size needs
            return Observation(
                Outcome.OOM,
                self.peak_bytes,
                self.line_bytes,
                need_bytes=self.peak_bytes,
                flat_bytes=self.flat_bytes,
                limit_bytes=moving,
                limit_moves_with_probes=own,
            )
        return Observation(
            self.outcome,
            self.peak_bytes,
            self.line_bytes,
            flat_bytes=self.flat_bytes,
            limit_bytes=moving,
            limit_moves_with_probes=own,
        )

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "batch_size": self.batch_size,
            "outcome": self.outcome.value,
            "peak_bytes": self.peak_bytes,
            "seconds": round(self.seconds, 4),
        }
        if self.reserved_bytes is not None:
            d["reserved_bytes"] = self.reserved_bytes
        if self.alloc_retries:
            d["alloc_retries"] = self.alloc_retries
        if self.retained_bytes:
            d["retained_bytes"] = self.retained_bytes
        if self.reused:
            d["reused"] = True
        if self.failure is not None:
            d["kind"] = self.failure.kind
            d["error_type"] = self.failure.error_type
            d["message"] = self.failure.message
        if self.need_bytes is not None:
            d["need_bytes"] = self.need_bytes
        if self.limit_after_bytes is not None:
            d["limit_after_bytes"] = self.limit_after_bytes
            if self.limit_moves_with_probes:
                d["limit_moves_with_probes"] = True
        if self.failed_op is not None:
            d["failed_op"] = self.failed_op
        if self.isolated:
            d["isolated"] = True
        return d

    def to_record(self) -> dict[str, Any]:
        """Everything, for passing between processes."""
        skip = ("outcome", "failure", "explained")
        return {
            **{k: v for k, v in self.__dict__.items() if k not in skip},
            "outcome": self.outcome.value,
            "failure": self.failure.to_dict() if self.failure else None,
            "explained": self.explained.to_dict() if self.explained else None,
        }

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> ProbeResult:
        fields = dict(d)
        fields["outcome"] = Outcome(fields["outcome"])
        fields["failure"] = Failure.from_dict(fields["failure"]) if fields["failure"] else None
        explained = fields.get("explained")
        fields["explained"] = PeakBreakdown.from_dict(explained) if explained else None
        return cls(**fields)


@dataclass(frozen=True)
class DeviceInfo:
    device: str
    name: str
    capacity_bytes: int
    free_bytes: int | None
    torch_version: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TraceCheck:
    """The fake-tensor trace against the first real probe of a search: traced bytes at that
    size, and what the probe measured — its peak, or, when it failed, what its failed
    allocation proved it needed at least."""

    batch_size: int
    traced_bytes: int
    measured_bytes: int
    at_least: bool = False  # measured from a failed allocation: a lower bound
    op: str | None = None  # the op that failed, or whose bytes differ most from the trace
    corrected: bool = True  # a search went on from the measurement (not so for estimate's)
    limit_bytes: int | None = None  # the limit the search was told, when it was told one

    #: within this share, the trace agreed
    AGREED = 0.02

    @property
    def ratio(self) -> float:
        return self.measured_bytes / self.traced_bytes if self.traced_bytes else float("inf")

    @property
    def agreed(self) -> bool:
        return not self.at_least and abs(self.ratio - 1) <= self.AGREED

    def describe(self, size: str = "batch") -> str:
        """ "trace agreed within 0.4% at batch 395", "trace under-counted by 3.6x at batch 491
        (largest op: mkldnn_rnn_layer): corrected from measurements"."""
        at = f"at {size} {self.batch_size}"
        if self.agreed:
            return f"trace agreed within {abs(self.ratio - 1):.1%} {at}"
        under = self.ratio > 1
        if (
            self.at_least
            and not under
            and self.limit_bytes
            and self.traced_bytes > self.limit_bytes
        ):
            return (  # the trace said it would not fit
                f"{size} {self.batch_size} failed as the trace said: it traced "
                f"{format_bytes(self.traced_bytes)}, over the {format_bytes(self.limit_bytes)} "
                "limit"
            )
        if self.at_least and not under:  # failed below what the trace says: not the trace's fault
            return (
                f"{size} {self.batch_size} failed with {format_bytes(self.measured_bytes)} live "
                f"and requested, under the trace's {format_bytes(self.traced_bytes)}: the limit "
                "is lower than the one told"
            )
        factor = self.ratio if under else 1 / self.ratio
        size = f"{factor:.2f}x" if factor < 1.1 else f"{factor:.1f}x"
        what = f"under-counted by {'at least ' if self.at_least else ''}{size}"
        if not under:
            what = f"over-counted by {size}"
        op = f" ({'failed' if self.at_least else 'largest'} op: {self.op})" if self.op else ""
        fix = ": corrected from measurements" if self.corrected else ""
        return f"trace {what} {at}{op}{fix}"

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": self.batch_size,
            "traced_bytes": self.traced_bytes,
            "measured_bytes": self.measured_bytes,
            "ratio": round(self.ratio, 4),
            "measured": "at least (a failed allocation)" if self.at_least else "peak",
            "op": self.op,
        }


@dataclass
class FindMaxResult:
    search: SearchResult
    probes: list[ProbeResult]
    device: DeviceInfo
    budget_bytes: int | None
    limit_bytes: int | None
    strategy: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    guess: int | None = None  # the estimate the search started from (strategy estimate)
    poisoned: bool = False  # an in-process probe hit a sticky device error
    world_size: int = 1  # ranks that probed together (torchrun)
    trace_check: TraceCheck | None = None  # the trace against the first real probe
    trace_seconds: float = 0.0  # of `seconds`, the time spent tracing (the prior)
    explained: PeakBreakdown | None = None  # what filled the peak at the max
    timeline: Timeline | None = None  # --plot: traced steps at the max
    #: what the sizes are: batch sizes, or (probe.axis: seq_len) sequence lengths at the
    #: micro-batch `held_batch_size`
    axis: str = "batch_size"
    held_batch_size: int | None = None

    @property
    def max_batch_size(self) -> int | None:
        return self.search.best

    @property
    def interrupted(self) -> bool:
        return self.search.stopped == "interrupted"

    @property
    def error(self) -> ProbeResult | None:
        return next((p for p in self.probes if p.outcome is Outcome.ERROR), None)

    def probe_at(self, batch_size: int | None) -> ProbeResult | None:
        return next(
            (p for p in self.probes if p.batch_size == batch_size and p.outcome is Outcome.FIT),
            None,
        )

    @property
    def peak_bytes(self) -> int | None:
        probe = self.probe_at(self.max_batch_size)
        return probe.peak_bytes if probe else None


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StepTiming:
    batch_size: int
    fwd_bwd_s: float  # first quartile over timed steps (timing.low_quantile)
    optimizer_s: float  # first quartile; optimizer.step + zero_grad (+ scaler)
    step_s: float  # first quartile of fwd_bwd + optimizer per step
    spread: float  # (q75 - q25) / median of the step times
    warmup_steps: int
    timed_steps: int
    #: forward+backward without gradient synchronization (distributed: accumulation steps but
    #: the last skip the all-reduce); None on one device, where the two are the same
    fwd_bwd_nosync_s: float | None = None
    #: of the time this process's threads wanted a CPU during the timed steps, the share they
    #: waited for one (Linux; None elsewhere): see schedstat.busy
    cpu_wait: float | None = None

    @property
    def unstable(self) -> bool:
        return self.spread > UNSTABLE_SPREAD

    @property
    def busy(self) -> bool:
        """Timed while other processes held the CPUs this one wanted."""
        return busy(self.cpu_wait)

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": self.batch_size,
            "fwd_bwd_time_s": self.fwd_bwd_s,
            "optimizer_time_s": self.optimizer_s,
            "step_time_s": self.step_s,
            "spread": round(self.spread, 4),
            "warmup_steps": self.warmup_steps,
            "timed_steps": self.timed_steps,
            "fwd_bwd_nosync_time_s": self.fwd_bwd_nosync_s,
            "cpu_wait": None if self.cpu_wait is None else round(self.cpu_wait, 4),
        }


@dataclass
class PlanRun:
    find_max: FindMaxResult
    plan: Plan | None
    timings: dict[int, StepTiming] = field(default_factory=dict)
    peaks: dict[int, ProbeResult] = field(default_factory=dict)
    flops_per_sample: float | None = None
    flops_fixed: float = 0.0
    flops_conv_share: float = 0.0  # of the FLOPs, those of convolutions
    headroom_batch_size: int | None = None
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    noise: NoiseRun | None = None  # when the spec has real data
    explained: PeakBreakdown | None = None  # what fills the peak at the recommended size
    what_if: list[WhatIf] | None = None  # plan --what-if


# --------------------------------------------------------------------------- the peak, explained


@dataclass(frozen=True)
class TensorAtPeak:
    """One storage live at the peak: who made it and what it is."""

    bytes: int
    shape: tuple[int, ...]
    dtype: str
    op: str  # the op whose output it was (aten name: mm, _log_softmax, ...)
    module: str  # the innermost module running when it was made, or (loss), (optimizer), ...
    kind: str  # parameters | gradients | optimizer_state | activations | other

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, object]:
        return {
            "bytes": self.bytes,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "op": self.op,
            "module": self.module,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class ModuleAtPeak:
    module: str
    bytes: int
    by_kind: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return {"module": self.module, "bytes": self.bytes, "by_kind": dict(self.by_kind)}


#: tensors kept per explanation (`--top` shows fewer)
KEEP_TENSORS = 32


@dataclass(frozen=True)
class PeakBreakdown:
    """What filled the peak at one size: every live storage grouped by the module that made it
    (its sums are the peak), the largest tensors, and one sentence reading them."""

    batch_size: int
    peak_bytes: int
    source: Literal["measured", "traced"]
    by_module: tuple[ModuleAtPeak, ...]
    top_tensors: tuple[TensorAtPeak, ...]
    reading: str

    @classmethod
    def of(
        cls,
        tensors: Iterable[TensorAtPeak],
        batch_size: int,
        source: Literal["measured", "traced"],
    ) -> PeakBreakdown:
        """From every storage live at the peak."""
        live = sorted(tensors, key=lambda t: -t.bytes)
        peak = sum(t.bytes for t in live)
        groups: dict[str, dict[str, int]] = {}
        for t in live:
            kinds = groups.setdefault(t.module, {})
            kinds[t.kind] = kinds.get(t.kind, 0) + t.bytes
        by_module = sorted(
            (ModuleAtPeak(m, sum(k.values()), k) for m, k in groups.items()),
            key=lambda m: -m.bytes,
        )
        return cls(
            batch_size, peak, source, tuple(by_module), tuple(live[:KEEP_TENSORS]),
            _reading(live, by_module, peak),
        )  # fmt: skip

    def to_dict(self, top: int | None = None) -> dict[str, object]:
        tensors = self.top_tensors if top is None else self.top_tensors[:top]
        return {
            "batch_size": self.batch_size,
            "peak_bytes": self.peak_bytes,
            "source": self.source,
            "reading": self.reading,
            "by_module": [m.to_dict() for m in self.by_module],
            "top_tensors": [t.to_dict() for t in tensors],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeakBreakdown:
        return cls(
            d["batch_size"],
            d["peak_bytes"],
            d["source"],
            tuple(ModuleAtPeak(m["module"], m["bytes"], dict(m["by_kind"])) for m in d["by_module"]),
            tuple(
                TensorAtPeak(t["bytes"], tuple(t["shape"]), t["dtype"], t["op"], t["module"], t["kind"])
                for t in d["top_tensors"]
            ),
            d["reading"],
        )  # fmt: skip


#: tensors whose element counts are within this share of the largest one's are read as one
#: family (the logits, their fp32 copy and the loss's log-softmax of them)
FAMILY = 0.02


def _is_loss(op: str) -> bool:
    return any(k in op for k in ("log_softmax", "nll_loss", "cross_entropy"))


def _reading(live: list[TensorAtPeak], by_module: list[ModuleAtPeak], peak: int) -> str:
    """One sentence: what most of the peak is. The largest tensor and its family (the same
    number of elements: one activation in several dtypes and layouts) when they are a fifth of
    the peak or more, else the largest module."""
    if not live or peak <= 0:
        return ""
    largest = live[0]
    family = [t for t in live if abs(t.numel - largest.numel) <= FAMILY * largest.numel]
    share = sum(t.bytes for t in family) / peak
    if share >= 0.2 and largest.numel > 1:
        where = list(dict.fromkeys(t.module for t in family))
        ops = list(dict.fromkeys(t.op for t in family))
        dtypes = list(dict.fromkeys(t.dtype for t in family))
        shape = "[" + ", ".join(str(d) for d in largest.shape) + "]"
        count = f"{len(family)} tensors" if len(family) > 1 else "one tensor"
        what = "the logits in the loss: " if any(_is_loss(op) for op in ops) else ""
        return (
            f"{share:.0%} of the peak is {what}{count} of {shape} ({', '.join(dtypes)}; "
            f"{', '.join(ops[:4])}) in {', '.join(where[:4])}"
        )
    top = by_module[0]
    kind = max(top.by_kind, key=lambda k: top.by_kind[k])
    return f"{top.bytes / peak:.0%} of the peak is {top.module} (mostly {kind.replace('_', ' ')})"


# --------------------------------------------------------------------------- estimate

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "other")
Category = Literal["parameters", "gradients", "optimizer_state", "activations", "other"]


@dataclass
class Breakdown:
    """Bytes by category at the peak."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    other: int = 0

    def as_dict(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in CATEGORIES}


@dataclass(frozen=True)
class Allowance:
    """What a real device adds to the traced peak."""

    fragmentation: float = 0.0  # relative: allocator rounding beyond 512 B blocks, fragmentation
    context_bytes: int = 0  # fixed, outside the allocator: CUDA context, library handles, NCCL
    workspace_bytes: int = 0  # fixed, inside the allocator: cuBLAS's workspaces, one per thread
    round_to: int = 1  # bytes every storage is rounded up to
    flash_attention: bool = False  # model attention as the GPU's memory-efficient kernels
    foreach: bool = False  # the optimizer's multi-tensor path, as torch runs it on CUDA

    def device_bytes(self, traced_bytes: int) -> int:
        return int(traced_bytes * (1.0 + self.fragmentation))

    def usable(self, capacity_bytes: int) -> int:
        return capacity_bytes - self.context_bytes - self.workspace_bytes

    def describe(self) -> str:
        from batchprobe.units import format_bytes

        if not (
            self.fragmentation or self.context_bytes or self.workspace_bytes or self.round_to > 1
        ):
            return "none (the trace is what the CPU backend measures)"
        parts = []
        if self.round_to > 1:
            parts.append(f"storages rounded up to {self.round_to} B")
        if self.fragmentation:
            parts.append(f"+{self.fragmentation:.0%} for allocator rounding and fragmentation")
        if self.context_bytes:
            parts.append(f"{format_bytes(self.context_bytes)} for the CUDA context and handles")
        if self.workspace_bytes:
            parts.append(f"{format_bytes(self.workspace_bytes)} for cuBLAS's workspaces")
        if self.flash_attention:
            parts.append("attention as memory-efficient kernels")
        if self.foreach:
            parts.append("the optimizer's foreach (multi-tensor) path, as torch runs it on CUDA")
        return "; ".join(parts)


@dataclass
class EstimatePoint:
    batch_size: int
    peak_bytes: int  # traced
    device_bytes: int  # with the allowance
    breakdown: Breakdown
    phase_peaks: dict[str, int] = field(default_factory=dict)
    op_bytes: dict[str, int] = field(default_factory=dict)  # bytes each op's outputs took
    seconds: float = 0.0  # how long the trace took
    explained: PeakBreakdown | None = field(default=None, repr=False)  # what filled the peak

    @property
    def line_bytes(self) -> int:
        """The traced peak of the phases that grow with the batch (forward, backward)."""
        values = [self.phase_peaks.get(p, 0) for p in ("forward", "backward")]
        return max(values) or self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "peak_bytes": self.peak_bytes,
            "device_bytes": self.device_bytes,
            "breakdown": self.breakdown.as_dict(),
        }


@dataclass
class EstimateResult:
    points: list[EstimatePoint]
    capacity_bytes: int
    usable_bytes: int
    allowance: Allowance
    target: str
    search: SearchResult
    seconds: float
    num_parameters: int

    @property
    def max_batch_size(self) -> int | None:
        return self.search.best

    def point(self, batch_size: int | None) -> EstimatePoint | None:
        return next((p for p in self.points if p.batch_size == batch_size), None)


Effect = Literal["none", "numerics", "data", "spec"]
EFFECTS: dict[Effect, str] = {
    "none": "same results",
    "numerics": "changes numerics",
    "data": "changes the data",
    "spec": "as specified",
}


@dataclass(frozen=True)
class WhatIf:
    """The estimated max micro-batch and its peak under one change to the spec (`change` is
    the `--set` that makes it), or why it could not be estimated."""

    change: str  # "(as specified)" for the spec itself
    max_batch_size: int | None
    peak_bytes: int | None  # on the target (with the allowance) at that max
    effect: Effect  # what else the change changes
    error: str | None = None

    @property
    def effect_text(self) -> str:
        return EFFECTS[self.effect]

    def to_dict(self) -> dict[str, object]:
        return {
            "change": self.change,
            "max_batch_size": self.max_batch_size,
            "peak_bytes": self.peak_bytes,
            "changes_numerics": self.effect == "numerics",
            "effect": self.effect_text,
            "error": self.error,
        }


@dataclass(frozen=True)
class SweepPoint:
    """estimate --sweep seq_len=...: the estimated max micro-batch at one sequence length."""

    seq_len: int
    max_batch_size: int | None
    peak_bytes: int | None  # on the target, at that max
    error: str | None = None

    @property
    def tokens(self) -> int | None:
        """Tokens per micro-batch at the max."""
        return None if self.max_batch_size is None else self.max_batch_size * self.seq_len

    def to_dict(self) -> dict[str, object]:
        return {
            "seq_len": self.seq_len,
            "max_batch_size": self.max_batch_size,
            "tokens_per_micro_batch": self.tokens,
            "peak_bytes": self.peak_bytes,
            "error": self.error,
        }


#: the memory timeline of traced steps: (phase, live bytes by kind) after each op that changed
#: them
Timeline = list[tuple[str, dict[str, int]]]


@dataclass(frozen=True)
class TraceFailure:
    """Why a model could not be traced with fake tensors, and the op when known."""

    message: str
    op: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class EstimateRun:
    target: str
    capacity_bytes: int
    allowance: Allowance
    result: EstimateResult | None = None
    trace_error: TraceFailure | None = None
    fallback: FindMaxResult | None = None  # real probes, when the model cannot be traced
    #: the trace against one real probe at the estimated max (the target is the device here)
    verified: TraceCheck | None = None
    verify_probe: ProbeResult | None = None
    what_if: list[WhatIf] | None = None  # estimate --what-if: the spec and each change
    sweep: list[SweepPoint] | None = None  # estimate --sweep seq_len=...
    timeline: Timeline | None = None  # --plot: traced steps at the max
    device: DeviceInfo | None = None  # the device here, when it was opened (to verify)

    @property
    def explained(self) -> PeakBreakdown | None:
        """What fills the peak at the (estimated, or measured) max."""
        if self.result is not None:
            point = self.result.point(self.result.max_batch_size)
            return point.explained if point is not None else None
        return self.fallback.explained if self.fallback is not None else None


# --------------------------------------------------------------------------- noise scale


@dataclass
class NoiseStats:
    """The two-batch estimator of the gradient noise scale (McCandlish et al. 2018, App. A).

    Per big batch: the mean squared norm of the micro-batch (B_small) gradients and the squared
    norm of their mean (the B_big gradient). Numerator and denominator are averaged over all big
    batches before dividing (the ratio of noisy estimates is biased)."""

    small_batch_size: int
    big_batch_size: int
    small_sq: list[float] = field(default_factory=list)
    big_sq: list[float] = field(default_factory=list)
    stopped: str = "done"  # done | data ran out | interrupted

    def add(self, small_sq: float, big_sq: float) -> None:
        self.small_sq.append(small_sq)
        self.big_sq.append(big_sq)

    @property
    def steps(self) -> int:
        return len(self.big_sq)

    def _parts(self, idx: Iterable[int]) -> tuple[float, float]:
        idx = list(idx)
        s = sum(self.small_sq[i] for i in idx) / len(idx)
        b = sum(self.big_sq[i] for i in idx) / len(idx)
        bs, bb = self.small_batch_size, self.big_batch_size
        g2 = (bb * b - bs * s) / (bb - bs)
        trace = (s - b) / (1 / bs - 1 / bb)
        return g2, trace

    def g2(self) -> float:
        return self._parts(range(self.steps))[0]

    def trace_sigma(self) -> float:
        return self._parts(range(self.steps))[1]

    def b_simple(self) -> float:
        g2, trace = self._parts(range(self.steps))
        return trace / g2 if g2 > 0 else math.inf

    def stderr(self, resamples: int = 500, seed: int = 0) -> float:
        """Bootstrap standard error of B_simple over the big batches."""
        if self.steps < 2:
            return math.inf
        rng = random.Random(seed)
        values = []
        for _ in range(resamples):
            g2, trace = self._parts(rng.randrange(self.steps) for _ in range(self.steps))
            if g2 > 0:
                values.append(trace / g2)
        if len(values) < resamples // 2:
            return math.inf  # |G|^2 is not resolved: the gradient is lost in its noise
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def steps_factor(batch: float, b_noise: float) -> float:
    """S / S_min = 1 + B_noise / B: optimizer steps relative to the fewest possible."""
    return 1 + b_noise / batch


def samples_factor(batch: float, b_noise: float) -> float:
    """E / E_min = 1 + B / B_noise: samples processed relative to the fewest possible."""
    return 1 + batch / b_noise


@dataclass
class NoiseRun:
    stats: NoiseStats
    seconds: float
    device: DeviceInfo

    @property
    def b_simple(self) -> float:
        return self.stats.b_simple()


# --------------------------------------------------------------------------- check

Metric = Literal["max_batch_size", "samples_per_s", "tokens_per_s", "peak_bytes"]


@dataclass(frozen=True)
class Expectation:
    name: Metric
    source: Literal["spec", "baseline"]
    value: float
    micro_batch_size: int | None = None

    @property
    def minimum(self) -> bool:
        return self.name != "peak_bytes"


@dataclass
class CheckOutcome:
    expectation: Expectation
    tolerance: float
    measured: float | None
    passed: bool
    detail: str = ""
    #: throughput checks: the timing's relative spread; a drop is a failure only beyond
    #: tolerance + noise (see flows.check.speed_verdict)
    noise: float | None = None
    #: throughput checks: the share of the time the process's threads waited for a CPU while
    #: timed (StepTiming.cpu_wait)
    cpu_wait: float | None = None

    @property
    def confidence(self) -> str | None:
        """ "firm" when the timing was steady on a machine with CPUs to spare, "noisy" when the
        steps varied or other processes held the CPUs."""
        if self.noise is None:
            return None
        return "firm" if self.noise <= UNSTABLE_SPREAD and not busy(self.cpu_wait) else "noisy"

    @property
    def threshold(self) -> float:
        e = self.expectation
        if e.name == "max_batch_size":  # a batch size: the smallest whole size that passes
            return max(1, math.ceil(e.value * (1 - self.tolerance)))
        return e.value * (1 - self.tolerance) if e.minimum else e.value * (1 + self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        e = self.expectation
        return {
            "name": e.name if e.micro_batch_size is None else f"{e.name}@{e.micro_batch_size}",
            "metric": e.name,
            "source": e.source,
            "micro_batch_size": e.micro_batch_size,
            "expected": e.value,
            "comparison": ">=" if e.minimum else "<=",
            "threshold": self.threshold,
            "tolerance": self.tolerance,
            "measured": self.measured,
            "passed": self.passed,
            "detail": self.detail,
            "noise": None if self.noise is None else round(self.noise, 4),
            "confidence": self.confidence,
            "cpu_wait": None if self.cpu_wait is None else round(self.cpu_wait, 4),
        }


@dataclass
class CheckRun:
    outcomes: list[CheckOutcome]
    device: DeviceInfo
    seconds: float
    baseline: dict[str, Any] | None = None  # what --update-baseline writes
    interrupted: bool = False

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes) and not self.interrupted
