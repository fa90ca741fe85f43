"""Warm-up, then timed training steps, forward+backward apart from the optimizer step.

Timing runs without the CPU memory tracker (a Python dispatch mode slows every op) and with the
device synchronized through the backend's marks (CUDA events on GPU). Warm-up runs at least
`min_warmup` steps and continues while step time is still falling, so compilation, cuDNN autotune
and allocator growth stay out of the figures. Splitting fwd+bwd from the optimizer lets a plan
project an update with accumulation exactly: `accum * t_fwd_bwd + t_optimizer`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from batchprobe.backends.base import Backend
from batchprobe.probe import classify
from batchprobe.results import Failure, StepTiming
from batchprobe.search import Outcome
from batchprobe.sources import Batch
from batchprobe.step import TrainStep

T = TypeVar("T")


def relative_spread(values: Sequence[float]) -> float:
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values) if values else 0.0
    q = statistics.quantiles(values, n=4)
    median = statistics.median(values)
    return (q[2] - q[0]) / median if median > 0 else 0.0


AnyRank = Callable[..., tuple[bool, ...]]
#: what a rank reports when the step failed on another rank, not here
PEER_FAILURE = "PeerFailure"


class _Guarded:
    """Runs the steps' calls and keeps the first failure (type and text only, as a probe does)."""

    def __init__(self) -> None:
        self.failure: Failure | None = None

    def __call__(self, call: Callable[[], T]) -> T | None:
        if self.failure is not None:
            return None
        try:
            return call()
        except Exception as exc:
            self.failure = classify(exc)
        return None


def time_steps(
    step: TrainStep,
    backend: Backend,
    batch_size: int,
    *,
    min_time_s: float = 1.0,
    min_steps: int = 5,
    max_steps: int = 100,
    min_warmup: int = 3,
    max_warmup: int = 20,
    on_step: Callable[[str, int], None] | None = None,
    nosync: bool = False,
    any_rank: AnyRank | None = None,
) -> StepTiming | Failure:
    """Time full training steps at `batch_size`: the timing, or how a step failed (an OOM while
    timed, a model error); it never raises for those.

    `nosync` also times forward+backward under no_sync (the accumulation steps of DDP/FSDP).
    `any_rank(*flags)` says, for each flag, whether it is set on any rank: under torchrun every
    rank must run the same steps (each holds a collective), so "go on?" and "did a step fail?"
    are decided together after every step — a rank whose step failed stops with the others,
    instead of leaving them in a collective (its failure is then agreed by the caller)."""
    together = any_rank or (lambda *flags: flags)
    guarded = _Guarded()
    step.begin()
    try:
        made = guarded(lambda: step.make_batch(batch_size))
        failed = made is None
        batch = made or Batch()

        def span(run: Callable[[], object]) -> tuple[Any, Any]:
            start = backend.mark()
            run()
            return start, backend.mark()

        def warm() -> float:
            return backend.elapsed_s(*span(lambda: step.train_step(batch)))

        def full() -> tuple[Any, Any, Any]:
            (m0, m1), (_, m2) = (
                span(lambda: step.forward_backward(batch)),
                span(step.optimizer_step),
            )
            return m0, m1, m2

        # -- warm-up: at least min_warmup, longer while the step time is still falling
        times: list[float] = []
        while not failed and len(times) < max_warmup:
            elapsed = guarded(warm)
            if elapsed is not None:
                times.append(elapsed)
                if on_step is not None:
                    on_step("warm-up", len(times))
            falling = len(times) < min_warmup or times[-1] < 0.97 * min(times[:-1])
            go_on, failed = together(falling, guarded.failure is not None)
            if not go_on:
                break
        # -- timed steps: forward+backward and the optimizer apart
        marks: list[tuple[Any, Any, Any]] = []
        started = time.perf_counter()
        while not failed and len(marks) < max_steps:
            marked = guarded(full)
            if marked is not None:
                marks.append(marked)
                if on_step is not None:
                    on_step("timed", len(marks))
            short = len(marks) < min_steps or time.perf_counter() - started < min_time_s
            go_on, failed = together(short, guarded.failure is not None)
            if not go_on:
                break
        nosync_s = None
        if nosync and not failed:

            def accumulate() -> list[tuple[Any, Any]]:
                with step.no_sync():
                    pairs = [span(lambda: step.forward_backward(batch)) for _ in marks]
                step.optimizer_step()  # clear the accumulated gradients
                backend.synchronize()
                return pairs

            pairs = guarded(accumulate)
            (failed,) = together(guarded.failure is not None)
            if pairs and not failed:
                nosync_s = statistics.median(backend.elapsed_s(a, b) for a, b in pairs)
        if failed:
            return guarded.failure or Failure(
                Outcome.ERROR, "error", PEER_FAILURE, "a step failed on another rank"
            )
        backend.synchronize()
        fwd_bwd = [backend.elapsed_s(a, b) for a, b, _ in marks]
        optim = [backend.elapsed_s(b, c) for _, b, c in marks]
        totals = [f + o for f, o in zip(fwd_bwd, optim, strict=True)]
        return StepTiming(
            batch_size=batch_size,
            fwd_bwd_s=statistics.median(fwd_bwd),
            optimizer_s=statistics.median(optim),
            step_s=statistics.median(totals),
            spread=relative_spread(totals),
            warmup_steps=len(times),
            timed_steps=len(marks),
            fwd_bwd_nosync_s=nosync_s,
        )
    finally:
        step.end()


def count_flops(step: TrainStep, batch_size: int) -> tuple[int, int]:
    """FLOPs of one forward+backward at `batch_size` (torch.utils.flop_counter): all of them,
    and those of convolutions (which a GPU may run in TF32 where matmuls do not)."""
    from torch.utils.flop_counter import FlopCounterMode

    step.begin()
    try:
        batch = step.make_batch(batch_size)
        with FlopCounterMode(display=False) as counter:
            step.forward_backward(batch)
        counts = counter.get_flop_counts().get("Global", {})
        conv = sum(n for op, n in counts.items() if "convolution" in str(op))
        return int(counter.get_total_flops()), int(conv)
    finally:
        step.end()


def flops_per_sample(step: TrainStep) -> tuple[float, float, float]:
    """(fixed, per-sample) FLOPs of forward+backward, from counts at batch 1 and 2, and the
    share of them that is convolutions."""
    (one, _), (two, conv) = count_flops(step, 1), count_flops(step, 2)
    per_sample = float(two - one)
    return float(one) - per_sample, per_sample, conv / two if two else 0.0
