"""Run one probe, classify how it ended, recover; and the loop that drives a search with probes.

This is the one impure loop. A probe at batch b: clean cache, fresh optimizer, at least two full
training steps (forward, loss, backward, optimizer.step, zero_grad(set_to_none=True)) under the
backend's memory tracking, so lazily created state (gradients, optimizer moments, GradScaler) is
inside the peak. Recovery happens after leaving the `except` block: only the exception's type name,
message and formatted traceback are kept, never the exception (its frames pin activations).
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batchprobe.backends import Backend, DeviceInfo
from batchprobe.search import Observation, Outcome, SearchResult, make_strategy, summarize
from batchprobe.step import TrainStep

# Lower-case fragments of exception messages, checked along the __cause__/__context__ chain after
# the exception types. Sources: REFERENCE.md "Failure modes a prober must handle".
OOM_PATTERNS: tuple[tuple[str, str], ...] = (
    ("batchprobe budget", "budget"),
    ("cuda out of memory", "allocator"),
    ("cuda error: out of memory", "cuda-runtime"),
    ("hip out of memory", "allocator"),
    ("hip error: out of memory", "hip-runtime"),
    ("xpu out of memory", "allocator"),
    ("mps backend out of memory", "allocator"),
    ("cublas_status_alloc_failed", "cublas"),
    ("cudnn_status_alloc_failed", "cudnn"),
    ("cudnn_status_not_supported", "cudnn"),  # large-batch conv/BN near the limit
    ("defaultcpuallocator: can't allocate memory", "host"),
    ("defaultcpuallocator: not enough memory", "host"),
    ("out of memory", "other"),
)
LIMIT_PATTERNS: tuple[str, ...] = (
    "nonzero is not supported for tensors with more than int_max elements",
    "canuse32bitindexmath",
    "32-bit index math",
    "invalid configuration argument",
    "integer out of range",
)
STICKY_PATTERNS: tuple[str, ...] = (
    "illegal memory access",
    "device-side assert triggered",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
)


@dataclass(frozen=True)
class Failure:
    outcome: Outcome
    kind: str  # budget | allocator | cublas | cudnn | host | limit | sticky | error ...
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


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> Failure:
    """fit/oom/limit/error for an exception raised by a probe: by type first, then by message."""
    chain = list(_chain(exc))
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = first_line[:500]
    name = type(exc).__name__
    for e in chain:
        if isinstance(e, MemoryError):
            return Failure(Outcome.OOM, "host", name, message)
        if isinstance(e, torch.OutOfMemoryError):
            text = str(e).lower()
            kind = next((k for p, k in OOM_PATTERNS if p in text), "allocator")
            return Failure(Outcome.OOM, kind, name, message)
    for e in chain:
        text = str(e).lower()
        for pattern in STICKY_PATTERNS:
            if pattern in text:
                return Failure(Outcome.ERROR, "sticky", name, message, _format(exc))
        for pattern, kind in OOM_PATTERNS:
            if pattern in text:
                return Failure(Outcome.OOM, kind, name, message)
        for pattern in LIMIT_PATTERNS:
            if pattern in text:
                return Failure(Outcome.LIMIT, "limit", name, message)
    return Failure(Outcome.ERROR, "error", name, message, _format(exc))


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


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
    isolated: bool = False  # ran in a child process

    def observation(self) -> Observation:
        if self.outcome is not Outcome.FIT:
            return Observation(self.outcome)
        return Observation(self.outcome, self.peak_bytes, self.line_bytes)

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
        if self.isolated:
            d["isolated"] = True
        return d

    def to_record(self) -> dict[str, Any]:
        """Everything, for passing between processes."""
        return {
            **{k: v for k, v in self.__dict__.items() if k not in ("outcome", "failure")},
            "outcome": self.outcome.value,
            "failure": self.failure.to_dict() if self.failure else None,
        }

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> ProbeResult:
        fields = dict(d)
        fields["outcome"] = Outcome(fields["outcome"])
        fields["failure"] = Failure.from_dict(fields["failure"]) if fields["failure"] else None
        return cls(**fields)


def is_thrashing(retries_per_step: Sequence[int]) -> bool:
    """Allocator thrash: the caching allocator had to free its cache and retry (cudaMalloc
    retries) in every one of the last two steps. It completes, slowly, on the edge of an OOM:
    it does not fit in practice (Composer treats it the same way)."""
    return len(retries_per_step) >= 2 and all(r > 0 for r in retries_per_step[-2:])


def clean(backend: Backend, collect: bool = True) -> None:
    if collect:
        gc.collect()
    backend.synchronize()
    backend.empty_cache()


def _run_steps(step: TrainStep, batch_size: int, steps: int, dry_run: bool) -> None:
    # Its own frame: when it unwinds, the batch and activations go with it.
    step.begin()
    batch = step.make_batch(batch_size)
    if dry_run:  # full steps without gradient synchronization: no collective at all
        for _ in range(steps):
            with step.no_sync():
                step.forward_backward(batch)
            step.optimizer_step()
        return
    for _ in range(steps):
        step.train_step(batch)


def run_probe(
    step: TrainStep, backend: Backend, batch_size: int, steps: int = 2, dry_run: bool = False
) -> ProbeResult:
    """One probe: `steps` full training steps at `batch_size`, then recovery. Never raises for
    OOM/limit/model errors (they become the outcome); KeyboardInterrupt passes through after
    cleanup. `dry_run`: the steps under no_sync, without collectives (the distributed pre-check)."""
    clean(backend, collect=False)
    failure: Failure | None = None
    started = time.perf_counter()
    meter = None
    retained = 0
    try:
        with backend.track(step) as meter:
            _run_steps(step, batch_size, steps, dry_run)
            backend.synchronize()
    except Exception as exc:
        failure = classify(exc)
    finally:
        # Recovery runs here, outside the except block: `exc` and its frames are gone.
        seconds = time.perf_counter() - started
        step.end()
        # A completed probe frees everything by reference counting; a failed one may leave
        # reference cycles (traceback frames), and only then is a full collection worth it.
        clean(backend, collect=failure is not None)
        if meter is not None:
            retained = meter.retained_bytes()
            if retained:
                clean(backend)
                retained = meter.retained_bytes()
            meter.close()
    assert meter is not None
    if failure is None and is_thrashing(meter.step_retries):
        failure = Failure(
            Outcome.OOM,
            "thrash",
            "AllocatorThrash",
            f"allocator retries in consecutive steps ({meter.step_retries}): on the edge of an OOM",
        )
    return ProbeResult(
        batch_size=batch_size,
        outcome=failure.outcome if failure else Outcome.FIT,
        peak_bytes=meter.peak_bytes,
        reserved_bytes=meter.reserved_bytes,
        seconds=seconds,
        retained_bytes=retained,
        alloc_retries=meter.alloc_retries,
        failure=failure,
        line_bytes=meter.line_bytes,
    )


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


ProbeCallback = Callable[[ProbeResult], None]


class _Watched:
    """Runs probes and watches what they leave: warns about memory still held, and switches to
    isolated probes when a sticky device error (or memory held after a failure) means this
    process can no longer be trusted."""

    def __init__(
        self,
        run: Callable[[int], ProbeResult],
        isolate: Callable[[], Callable[[int], ProbeResult]] | None,
    ) -> None:
        self.run = run
        self.isolate = isolate
        self.warnings: list[str] = []
        self.poisoned = False
        # Some wrappers keep buffers from one step to the next (FSDP): what the first completed
        # probe leaves is their steady state; more than that is a leak.
        self.steady: int | None = None

    def __call__(self, b: int) -> ProbeResult:
        result = self.run(b)
        failure = result.failure
        if failure is None and self.steady is None:
            self.steady = result.retained_bytes
        extra = result.retained_bytes - (self.steady or 0)
        sticky = failure is not None and failure.sticky
        leaked = extra > 0 and failure is not None
        if (sticky or leaked) and self.isolate is not None and not result.isolated:
            assert failure is not None
            why = (
                f"a sticky device error at batch {b} ({failure.message})"
                if sticky
                else f"{result.retained_bytes} bytes still held after the failure at batch {b}"
            )
            self.warnings.append(f"{why}: switching to isolated probes (one process each)")
            self.run, self.isolate = self.isolate(), None
            if sticky:  # this process can no longer tell: ask a fresh one
                self.poisoned = True
                result = self.run(b)
        elif extra > 0:
            self.warnings.append(
                f"probe at batch {b} left {extra} bytes allocated after recovery; later probes "
                "may see less memory (try --isolate)"
            )
        return result


def find_max(
    step: TrainStep,
    backend: Backend,
    *,
    start: int = 1,
    cap: int = 65536,
    strategy: str = "auto",
    steps: int = 2,
    on_start: Callable[[int], None] | None = None,
    on_probe: ProbeCallback | None = None,
    prober: Callable[[int], ProbeResult] | None = None,
    known: Mapping[int, int] | None = None,
    guess: int | None = None,
    isolate: Callable[[], Callable[[int], ProbeResult]] | None = None,
    limit_bytes: int | None = None,
) -> FindMaxResult:
    """Drive a search strategy with real probes. Ctrl-C ends it with the probes made so far.

    `known` maps batch sizes to peaks measured earlier (completed probes): against the current
    limit they answer without running again (peak <= limit: fit, else oom).
    `isolate` makes a prober that runs each probe in a child process: the search switches to it
    when an in-process probe hits a sticky device error (the probe is run again, isolated) or
    leaves memory behind after a failure.
    """
    limit = limit_bytes or backend.budget_bytes or backend.free_bytes_at_start
    name = strategy if strategy != "auto" else ("predict" if limit else "doubling")
    gen = make_strategy(name, start, cap, limit, guess)
    watched = _Watched(prober or (lambda b: run_probe(step, backend, b, steps)), isolate)
    probes: list[ProbeResult] = []
    interrupted = False
    started = time.perf_counter()
    try:
        b = next(gen)
        while True:
            if known is not None and b in known and limit:
                fits = known[b] <= limit
                result = ProbeResult(
                    b, Outcome.FIT if fits else Outcome.OOM, known[b], 0.0, reused=True
                )
            else:
                if on_start is not None:
                    on_start(b)
                result = watched(b)
            probes.append(result)
            if on_probe is not None:
                on_probe(result)
            b = gen.send(result.observation())
    except StopIteration:
        pass
    except KeyboardInterrupt:
        interrupted = True
    outcome = summarize(
        [(p.batch_size, p.observation()) for p in probes], cap, interrupted=interrupted
    )
    return FindMaxResult(
        search=outcome,
        probes=probes,
        device=backend.info(),
        budget_bytes=backend.budget_bytes,
        limit_bytes=limit,
        strategy=name,
        seconds=time.perf_counter() - started,
        warnings=watched.warnings,
        poisoned=watched.poisoned,
    )
