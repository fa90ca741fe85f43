"""Run one probe, classify how it ended, recover; and the loop that drives a search with probes.

This is the one impure loop. A probe at batch b: clean cache, fresh optimizer, at least two full
training steps (forward, loss, backward, optimizer.step, zero_grad(set_to_none=True)) under the
backend's memory tracking, so lazily created state (gradients, optimizer moments, GradScaler) is
inside the peak. Recovery happens after leaving the `except` block: only the exception's type name,
message and formatted traceback are kept, never the exception (its frames pin activations).
"""

from __future__ import annotations

import gc
import re
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from batchprobe.backends.base import MemoryFigures
from batchprobe.results import Failure, FailureKind, ProbeResult
from batchprobe.schedstat import settle_threads
from batchprobe.search import Observation, Outcome, StrategyGen
from batchprobe.step import TrainStep

if TYPE_CHECKING:
    from batchprobe.backends.base import Backend, Meter

T = TypeVar("T")

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
    # cublasCreate under memory pressure: the handle's own device memory did not fit
    ("cublas_status_not_initialized", "cublas"),
    ("cudnn_status_alloc_failed", "cudnn"),
    # cuDNN's internal allocations near the limit (v8), and v9's frontend when no engine's
    # workspace fits ("FIND was unable to find an engine", "GET was unable ...")
    ("cudnn_status_internal_error", "cudnn"),
    ("unable to find an engine to execute this computation", "cudnn"),
    # a convolution or BatchNorm too large for cuDNN's kernels: a batch limit near the top, but
    # at batch 1 a model or configuration error (see NOT_MEMORY_AT_ONE)
    ("cudnn_status_not_supported", "unsupported"),
    ("cufft_alloc_failed", "cufft"),
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
#: a library's own failed allocation, which under a host limit that fails allocations (an
#: rlimit) is that limit: oneDNN reports it as a primitive it could not create, C++ as
#: bad_alloc. Not "could not create a primitive descriptor": a configuration oneDNN does not
#: support (bf16 on a CPU without the instructions), whatever the memory
HOST_OOM_RE = re.compile(r"could not create a primitive(?! descriptor)|std::bad_alloc")
#: failures that mean "too large" near the boundary, but not memory when even batch 1 fails
NOT_MEMORY_AT_ONE: frozenset[FailureKind] = frozenset({"unsupported"})
#: cudaError_t codes (torch.AcceleratorError.error_code, torch >= 2.8)
CUDA_OOM_CODES = frozenset({2})  # cudaErrorMemoryAllocation
CUDA_STICKY_CODES = frozenset({214, 700, 710, 715, 716, 719})  # ECC, illegal address, assert, ...
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


def classify(exc: BaseException, host_limited: bool = False) -> Failure:
    """fit/oom/limit/error for an exception raised by a probe: by type first, then by message.
    `host_limited`: the process runs under a limit that fails its allocations (an rlimit), so
    a library's own failed allocation is that limit's OOM too (`HOST_OOM_RE`)."""
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
        code = getattr(e, "error_code", None)  # a failed CUDA runtime call says which
        if isinstance(code, int) and code in CUDA_OOM_CODES:
            return Failure(Outcome.OOM, "cuda-runtime", name, message)
        if isinstance(code, int) and code in CUDA_STICKY_CODES:
            return Failure(Outcome.ERROR, "sticky", name, message, _format(exc))
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
        if host_limited and HOST_OOM_RE.search(text):
            return Failure(Outcome.OOM, "host", name, message)
    return Failure(Outcome.ERROR, "error", name, message, _format(exc))


#: the segments PyTorch's caching allocator takes for pooled blocks (its OOM message's "Tried to
#: allocate" is the segment): 2 MiB for blocks up to 1 MiB, 20 MiB for those up to 10 MiB; a
#: larger block gets its own segment, its size rounded up to 2 MiB
POOLED_SEGMENTS = frozenset({2 * 1024**2, 20 * 1024**2})
_SIZE = r"(\d+(?:\.\d+)?)\s*(bytes|[KMGTP]i?B|B)\b"
_REQUEST_RE = re.compile(r"tried to allocate (?:more than )?" + _SIZE, re.IGNORECASE)
_ALLOCATED_RE = re.compile(_SIZE + r" is allocated by PyTorch", re.IGNORECASE)
_UNIT = {"bytes": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
         "pb": 1000**5, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
         "pib": 1024**5}  # fmt: skip


def _size(match: re.Match[str] | None) -> int | None:
    if match is None:
        return None
    return int(float(match.group(1)) * _UNIT[match.group(2).lower()])


def failed_allocation(text: str, meter: Meter | None) -> tuple[int | None, int | None, str | None]:
    """(live, need, op) of an out-of-memory failure: the bytes live when the allocation failed,
    live plus the request, and the op that asked. The backend's own record comes first (the
    CPU's ledger saw the op); else the allocator's message ("Tried to allocate 2.00 GiB ... Of
    the allocated memory 75.50 GiB is allocated by PyTorch"; the host allocator's "you tried
    to allocate N bytes")."""
    recorded = meter.failed_allocation() if meter is not None else None
    request = _size(_REQUEST_RE.search(text))
    if recorded is not None:
        op, live, seen = recorded
        request = seen if seen is not None else request
        return live, (live + request if request is not None else None), op
    allocated = _size(_ALLOCATED_RE.search(text))
    if allocated is None or request is None or request in POOLED_SEGMENTS:
        # a caching allocator names the segment it asked the device for, not the block: a
        # pooled segment (2 MiB for blocks up to 1 MiB, 20 MiB up to 10 MiB) says only that the
        # block was smaller, and live plus 20 MiB overstated what a size needs by up to 19 MiB
        # (the search then steepened its line on it and walked: 24 probes on a simulated GPU)
        return allocated, None, None
    return allocated, allocated + request, None


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
    OOM/limit/model errors, nor for a device that fails during cleanup (a sticky error makes
    every later call fail: that is the outcome); KeyboardInterrupt passes through after cleanup.
    `dry_run`: the steps under no_sync, without collectives (the distributed pre-check)."""
    started = time.perf_counter()
    failure = _quietly(lambda: clean(backend, collect=False))
    meter = None
    retained = 0
    text = ""  # the failure's messages, for what its allocator said
    if failure is None:
        try:
            with backend.track(step.persistent_tensors(), step.runner) as meter:
                step.observer = meter
                _run_steps(step, batch_size, steps, dry_run)
                backend.synchronize()
        except Exception as exc:
            failure = classify(exc, host_limited=meter is not None and meter.host_limited)
            text = " ".join(str(e) for e in _chain(exc))
        finally:
            # Recovery runs here, outside the except block: `exc` and its frames are gone.
            step.observer = None
            step.end()
            # A completed probe frees everything by reference counting; a failed one may leave
            # reference cycles (traceback frames), and only then is a full collection worth it.
            after = _quietly(lambda: clean(backend, collect=failure is not None))
            if after is None and meter is not None:
                retained, after = _retained(backend, meter)
            failure = failure if failure is not None and failure.sticky else after or failure
            if meter is not None:
                meter.close()
    seconds = time.perf_counter() - started
    figures = meter.figures if meter is not None else MemoryFigures()
    live = need = op = None
    if failure is not None and failure.outcome is Outcome.OOM:
        live, need, op = failed_allocation(text, meter)
        recorded = meter.failed_allocation() if meter is not None else None
        if failure.kind == "host" and (recorded is None or recorded[2] is None):
            # the host's limit (an rlimit, the RAM) counts what the process maps, not tensor
            # bytes — library kernels, scratch inside an op: the request its message names
            # bounds nothing in live tensor bytes. Only the backend's own reading of the room
            # the host had when the op failed does (the CPU meter's, under an rlimit)
            live = need = None
    if failure is None and is_thrashing(figures.step_retries):
        failure = Failure(
            Outcome.OOM,
            "thrash",
            "AllocatorThrash",
            f"allocator retries in consecutive steps ({figures.step_retries}): on the edge of "
            "an OOM",
        )
    limit_now = None
    if failure is None or not failure.sticky:
        limit_now = _quietly_read(backend.limit_now)
    return ProbeResult(
        batch_size=batch_size,
        outcome=failure.outcome if failure else Outcome.FIT,
        peak_bytes=figures.peak_bytes if meter is not None else None,
        reserved_bytes=figures.reserved_bytes,
        seconds=seconds,
        retained_bytes=retained,
        alloc_retries=figures.alloc_retries,
        failure=failure,
        line_bytes=figures.line_bytes,
        flat_bytes=figures.flat_bytes,
        live_bytes=live,
        need_bytes=need,
        failed_op=op,
        limit_after_bytes=limit_now[0] if limit_now is not None else None,
        limit_moves_with_probes=limit_now is not None and limit_now[1],
        op_bytes=figures.op_bytes,
        explained=(
            figures.explained(batch_size, "measured")
            if figures.explained is not None and failure is None
            else None
        ),
    )


def _quietly(call: Callable[[], object]) -> Failure | None:
    """Run a device call that must not end the search: a failure (a sticky device error makes
    synchronize and empty_cache fail) becomes an outcome."""
    try:
        call()
    except Exception as exc:
        return classify(exc)
    return None


def _quietly_read(read: Callable[[], T | None]) -> T | None:
    """A figure read from a device that may have failed (None then)."""
    try:
        return read()
    except Exception:
        return None


def _retained(backend: Backend, meter: Meter) -> tuple[int, Failure | None]:
    """Bytes the probe left allocated after recovery (a second full cleanup first, if any;
    then, if some are still held, once the process's other threads are at rest: a collective's
    worker thread lets go of its buffers only after the step was told it is done)."""
    try:
        retained = meter.retained_bytes()
        if retained:
            clean(backend)
            retained = meter.retained_bytes()
        if retained and settle_threads():
            retained = meter.retained_bytes()
    except Exception as exc:
        return 0, classify(exc)
    return retained, None


Prober = Callable[[int], ProbeResult]


def warm_up(run: Prober, backend: Backend) -> ProbeResult:
    """Full steps at batch 1 before any probe: what a process creates once and keeps — cuBLAS
    handles and their workspaces (one per thread: forward and autograd), cuDNN handles, lazily
    loaded kernels, FSDP's buffers, the NCCL communicator — then belongs to the baseline every
    probe measures against, not to the first probe's peak or "retained" memory. Batch 1: the
    smallest step that runs all of it. Free memory is read again after. The result is a
    measured batch 1 (a search learns from it, and need not probe 1 again)."""
    result = run(1)
    backend.settle()
    return result


class ProbeProgress(Protocol):
    """Told when a probe starts and what it found."""

    def probe_started(self, batch_size: int) -> None: ...

    def probe_done(self, result: ProbeResult) -> None: ...


#: memory a probe may leave behind before it counts: libraries keep a few small blocks of their
#: own (collective bookkeeping, cached descriptors); each probe's exact figure is in its result
LEAK_BYTES = 1024**2


class WatchedProber:
    """Runs probes and watches what they leave: warns about memory still held (from LEAK_BYTES),
    and switches to isolated probes when a sticky device error (or memory held after a failure)
    means this process can no longer be trusted. Once switched, it stays switched."""

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
        leaked = extra >= LEAK_BYTES and failure is not None
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
        elif extra >= LEAK_BYTES:
            self.warnings.append(
                f"probe at batch {b} left {extra} bytes allocated after recovery; later probes "
                "may see less memory (try --isolate)"
            )
        return result


def _at_one(result: ProbeResult) -> ProbeResult:
    """A kernel that refuses the input when even batch 1 fails is not a memory limit but the
    model or its configuration: an error (exit 2), not "nothing fits"."""
    failure = result.failure
    if result.batch_size > 1 or failure is None or failure.kind not in NOT_MEMORY_AT_ONE:
        return result
    message = (
        f"{failure.message} (at batch 1: not a memory limit — check the model's layers and dtypes)"
    )
    error = replace(failure, outcome=Outcome.ERROR, kind="error", message=message)
    return replace(result, outcome=Outcome.ERROR, failure=error)


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
                # its reading of the limit is of another time: none
                result = replace(
                    earlier,
                    reused=True,
                    seconds=0.0,
                    limit_after_bytes=None,
                    limit_moves_with_probes=False,
                )
            else:
                if progress is not None:
                    progress.probe_started(b)
                result = _at_one(prober(b))
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
