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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch

from batchprobe.results import Failure, FailureKind, ProbeResult
from batchprobe.search import Observation, Outcome, StrategyGen
from batchprobe.step import TrainStep

if TYPE_CHECKING:
    from batchprobe.backends.base import Backend

# Lower-case fragments of exception messages, checked along the __cause__/__context__ chain after
# the exception types: the texts PyTorch raises for each way of running out of memory (caching
# allocators, raw CUDA/HIP, cuBLAS/cuDNN allocations, the host allocator), for batch limits that
# are not memory, and for sticky device errors after which only a new process recovers.
OOM_PATTERNS: tuple[tuple[str, FailureKind], ...] = (
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
            kind: FailureKind = next((k for p, k in OOM_PATTERNS if p in text), "allocator")
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
        with backend.track(step.persistent_tensors()) as meter:
            step.observer = meter
            _run_steps(step, batch_size, steps, dry_run)
            backend.synchronize()
    except Exception as exc:
        failure = classify(exc)
    finally:
        # Recovery runs here, outside the except block: `exc` and its frames are gone.
        seconds = time.perf_counter() - started
        step.observer = None
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
    figures = meter.figures
    if failure is None and is_thrashing(figures.step_retries):
        failure = Failure(
            Outcome.OOM,
            "thrash",
            "AllocatorThrash",
            f"allocator retries in consecutive steps ({figures.step_retries}): on the edge of "
            "an OOM",
        )
    return ProbeResult(
        batch_size=batch_size,
        outcome=failure.outcome if failure else Outcome.FIT,
        peak_bytes=figures.peak_bytes,
        reserved_bytes=figures.reserved_bytes,
        seconds=seconds,
        retained_bytes=retained,
        alloc_retries=figures.alloc_retries,
        failure=failure,
        line_bytes=figures.line_bytes,
    )


Prober = Callable[[int], ProbeResult]


class ProbeProgress(Protocol):
    """Told when a probe starts and what it found."""

    def probe_started(self, batch_size: int) -> None: ...

    def probe_done(self, result: ProbeResult) -> None: ...


class WatchedProber:
    """Runs probes and watches what they leave: warns about memory still held, and switches to
    isolated probes when a sticky device error (or memory held after a failure) means this
    process can no longer be trusted. Once switched, it stays switched."""

    def __init__(self, run: Prober, isolate: Callable[[], Prober] | None) -> None:
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


@dataclass
class Driven:
    """What a driven search did: every probe (run or reused) and what the strategy was told."""

    probes: list[ProbeResult] = field(default_factory=list)
    observations: list[tuple[int, Observation]] = field(default_factory=list)
    interrupted: bool = False


def drive(
    strategy: StrategyGen,
    prober: Prober,
    *,
    limit_bytes: int | None = None,
    known: Mapping[int, ProbeResult] | None = None,
    progress: ProbeProgress | None = None,
) -> Driven:
    """Drive a search strategy with probes until it ends; Ctrl-C ends it with what it has.

    Each outcome is judged against `limit_bytes` (a completed probe whose peak is above it did
    not fit: plan's headroom search runs under the full budget but asks about less). `known`
    holds completed probes from earlier: they answer again without running."""
    done = Driven()
    try:
        b = next(strategy)
        while True:
            earlier = known.get(b) if known is not None else None
            if earlier is not None:
                result = replace(earlier, reused=True, seconds=0.0)
            else:
                if progress is not None:
                    progress.probe_started(b)
                result = prober(b)
            observation = result.observation(limit_bytes)
            done.probes.append(result)
            done.observations.append((b, observation))
            if progress is not None:
                progress.probe_done(result)
            b = strategy.send(observation)
    except StopIteration:
        pass
    except KeyboardInterrupt:
        done.interrupted = True
    return done
