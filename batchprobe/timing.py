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
from typing import Any

from batchprobe.backends.base import Backend
from batchprobe.results import StepTiming
from batchprobe.step import TrainStep


def relative_spread(values: Sequence[float]) -> float:
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values) if values else 0.0
    q = statistics.quantiles(values, n=4)
    median = statistics.median(values)
    return (q[2] - q[0]) / median if median > 0 else 0.0


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
    any_rank: Callable[[bool], bool] | None = None,
) -> StepTiming:
    """Time full training steps at `batch_size`. Raises what the step raises (e.g. an OOM).
    `nosync` also times forward+backward under no_sync (the accumulation steps of DDP/FSDP).
    `any_rank(flag)` is True when the flag is set on any rank: under torchrun every rank must
    run the same number of steps (each holds a collective), so "go on?" is decided together."""
    together = any_rank or (lambda flag: flag)
    step.begin()
    try:
        batch = step.make_batch(batch_size)
        # -- warm-up: at least min_warmup, longer while the step time is still falling
        times: list[float] = []
        while len(times) < max_warmup:
            start = backend.mark()
            step.train_step(batch)
            end = backend.mark()
            times.append(backend.elapsed_s(start, end))
            if on_step is not None:
                on_step("warm-up", len(times))
            still_falling = len(times) < min_warmup or times[-1] < 0.97 * min(times[:-1])
            if not together(still_falling):
                break
        warmup = len(times)
        # -- timed steps
        marks: list[tuple[Any, Any, Any]] = []
        started = time.perf_counter()
        while len(marks) < max_steps:
            m0 = backend.mark()
            step.forward_backward(batch)
            m1 = backend.mark()
            step.optimizer_step()
            m2 = backend.mark()
            marks.append((m0, m1, m2))
            if on_step is not None:
                on_step("timed", len(marks))
            short = len(marks) < min_steps or time.perf_counter() - started < min_time_s
            if not together(short):
                break
        backend.synchronize()
        fwd_bwd = [backend.elapsed_s(a, b) for a, b, _ in marks]
        optim = [backend.elapsed_s(b, c) for _, b, c in marks]
        totals = [f + o for f, o in zip(fwd_bwd, optim, strict=True)]
        nosync_s = None
        if nosync:
            pairs = []
            with step.no_sync():
                for _ in range(len(marks)):
                    m0 = backend.mark()
                    step.forward_backward(batch)
                    pairs.append((m0, backend.mark()))
            step.optimizer_step()  # clear the accumulated gradients
            backend.synchronize()
            nosync_s = statistics.median(backend.elapsed_s(a, b) for a, b in pairs)
        return StepTiming(
            batch_size=batch_size,
            fwd_bwd_s=statistics.median(fwd_bwd),
            optimizer_s=statistics.median(optim),
            step_s=statistics.median(totals),
            spread=relative_spread(totals),
            warmup_steps=warmup,
            timed_steps=len(marks),
            fwd_bwd_nosync_s=nosync_s,
        )
    finally:
        step.end()


def count_flops(step: TrainStep, batch_size: int) -> int:
    """FLOPs of one forward+backward at `batch_size` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    step.begin()
    try:
        batch = step.make_batch(batch_size)
        with FlopCounterMode(display=False) as counter:
            step.forward_backward(batch)
        return int(counter.get_total_flops())
    finally:
        step.end()


def flops_per_sample(step: TrainStep) -> tuple[float, float]:
    """(fixed, per-sample) FLOPs of forward+backward, from counts at batch 1 and 2."""
    one, two = count_flops(step, 1), count_flops(step, 2)
    per_sample = float(two - one)
    return float(one) - per_sample, per_sample
