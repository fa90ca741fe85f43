"""Warm-up, then timed training steps, forward+backward apart from the optimizer step.

Timing runs without the CPU memory tracker (a Python dispatch mode slows every op) and with the
device synchronized through the backend's marks (CUDA events on GPU). Warm-up runs at least
`min_warmup` steps and continues while step time is still falling, so compilation, cuDNN autotune
and allocator growth stay out of the figures. Splitting fwd+bwd from the optimizer lets a plan
project an update with accumulation exactly: `accum * t_fwd_bwd + t_optimizer`.

A plan compares sizes, so they are timed together (`time_sizes`): interleaved rounds, so that a
busy spell on a shared machine slows every size alike instead of one, and the first quartile of
the steps, a figure other work can only push up, not down.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from batchprobe.backends.base import Backend
from batchprobe.probe import classify
from batchprobe.results import Failure, StepTiming
from batchprobe.schedstat import CpuWait
from batchprobe.search import Outcome
from batchprobe.sources import Batch
from batchprobe.step import TrainStep

T = TypeVar("T")


class TimingProgress(Protocol):
    """Told which size is timed, which round runs, and each size's figures when agreed."""

    def candidate(self, batch_size: int, index: int, count: int) -> None: ...

    def round(self, index: int, count: int) -> None: ...

    def timed(self, batch_size: int, timing: StepTiming) -> None: ...


ROUNDS = 4  # interleaved rounds after the first pass
FIRST_STEPS = 1  # timed steps per size in the first pass (what Ctrl-C keeps at the least)
NOSYNC_STEPS = 20  # at most this many no_sync passes per size


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


def low_quantile(values: Sequence[float]) -> float:
    """The first quartile: other work on the machine can only make a step slower, so the fast
    end of repeated measurements is the figure load disturbs least (the median moves with it)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=4, method="inclusive")[0]


class _Sizes:
    """Per size: the timed marks so far, and how it failed; the batch of the size being run."""

    def __init__(self, sizes: Sequence[int], make: Callable[[int], Batch]) -> None:
        self.order = list(sizes)
        self.make = make
        self.started: set[int] = set()
        self.warmup: dict[int, int] = {}
        self.marks: dict[int, list[tuple[Any, Any, Any]]] = {b: [] for b in sizes}
        self.failed: dict[int, Failure] = {}
        self.nosync: dict[int, float] = {}
        self.waits: dict[int, CpuWait] = {b: CpuWait() for b in sizes}
        self._batch: tuple[int, Batch] | None = None

    def batch(self, b: int) -> Batch:
        """The batch of size `b`, made when the sizes change. One batch is alive at a time: a
        probe measured each size with its own batch only, and the max has no room for the
        others' (an MLP's 26 MiB batches of 8400 samples and below took what the max needed)."""
        if self._batch is None or self._batch[0] != b:
            self._batch = None  # the last size's batch goes first
            self._batch = (b, self.make(b))
        return self._batch[1]

    def drop(self) -> None:
        self._batch = None

    def alive(self) -> list[int]:
        return [b for b in self.order if b in self.started and b not in self.failed]


def time_sizes(
    step: TrainStep,
    backend: Backend,
    sizes: Sequence[int],
    *,
    min_time_s: float = 1.0,
    min_steps: int = 5,
    max_steps: int = 100,
    min_warmup: int = 3,
    max_warmup: int = 20,
    rounds: int = ROUNDS,
    nosync: bool = False,
    any_rank: AnyRank | None = None,
    agree_failure: Callable[[Failure], Failure] | None = None,
    on_size: Callable[[int, int, int], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
    into: dict[int, StepTiming | Failure] | None = None,
) -> dict[int, StepTiming | Failure]:
    """Time full training steps at each of `sizes`: per size its timing, or how a step failed
    (an OOM while timed, a model error); it never raises for those.

    So that other work on the machine cannot invert the comparison, the sizes are measured
    together: each is warmed up and timed for `FIRST_STEPS` steps in turn, then `rounds` rounds
    visit every size with a burst of steps, reversed and in order in turn (ABBA: a load that
    rises or falls steadily hits every size alike over two rounds); a size whose spread is
    still above UNSTABLE_SPREAD gets one more set of rounds. Each figure is the first quartile of its steps (`low_quantile`), and `spread`
    says how much they varied. Every size ends with at least `min_steps` timed steps and about
    `min_time_s` of them (at most `max_steps`; twice that when re-measured).

    `nosync` also times forward+backward under no_sync (the accumulation steps of DDP/FSDP).
    `any_rank(*flags)` says, for each flag, whether it is set on any rank: under torchrun every
    rank must run the same steps (each holds a collective), so "go on?" and "did a step fail?"
    are decided together after every step — a rank whose step failed stops with the others,
    instead of leaving them in a collective; `agree_failure` then settles on every rank what
    failed (the session's ranks), before the step starts afresh for the other sizes.

    `into` is filled as sizes finish, and on Ctrl-C with what was measured so far (the
    KeyboardInterrupt is then raised again)."""
    together = any_rank or (lambda *flags: flags)
    out: dict[int, StepTiming | Failure] = {} if into is None else into
    state = _Sizes(sizes, step.make_batch)
    guarded = _Guarded()

    def span(run: Callable[[], object]) -> tuple[Any, Any]:
        start = backend.mark()
        run()
        return start, backend.mark()

    def full(batch: Batch) -> tuple[Any, Any, Any]:
        (m0, m1), (_, m2) = (
            span(lambda: step.forward_backward(batch)),
            span(step.optimizer_step),
        )
        return m0, m1, m2

    def fail(b: int) -> None:
        """Size `b` failed here or on another rank: drop it, agree on why (which, under
        torchrun, also replaces the data group a failed collective aborted), start afresh."""
        failure = guarded.failure or Failure(
            Outcome.ERROR, "error", PEER_FAILURE, "a step failed on another rank"
        )
        guarded.failure = None
        state.drop()
        step.end()
        state.failed[b] = out[b] = agree_failure(failure) if agree_failure else failure
        step.begin()

    def burst(b: int, count: int) -> bool:
        """`count` timed steps at `b` (as many as the rank that wants most: a rank that wants
        none runs them too); False if it failed."""
        (go_on,) = together(count > 0)
        done = 0
        while go_on:
            batch = guarded(functools.partial(state.batch, b))  # made before the wait counts
            state.waits[b].start()
            marked = guarded(functools.partial(full, batch)) if batch is not None else None
            state.waits[b].stop()
            if marked is not None:
                state.marks[b].append(marked)
                done += 1
            go_on, failed = together(done < count, guarded.failure is not None)
            if failed:
                fail(b)
                return False
        return True

    def timed(batch: Batch) -> float:
        return float(backend.elapsed_s(*span(lambda: step.train_step(batch))))

    def warm_up(b: int) -> bool:
        times: list[float] = []
        while len(times) < max_warmup:
            batch = guarded(functools.partial(state.batch, b))  # made outside the span
            elapsed = guarded(functools.partial(timed, batch)) if batch is not None else None
            if elapsed is not None:
                times.append(elapsed)
            falling = len(times) < min_warmup or times[-1] < 0.97 * min(times[:-1])
            go_on, failed = together(falling, guarded.failure is not None)
            if failed:
                fail(b)
                return False
            if not go_on:
                break
        state.warmup[b] = len(times)
        return True

    step.begin()
    try:
        # -- each size in turn: its batch, warm-up, a first few timed steps
        for i, b in enumerate(state.order, 1):
            if on_size is not None:
                on_size(b, i, len(state.order))
            # (not kept here: a batch bound to a name outlives the size's turn)
            made = guarded(functools.partial(state.batch, b)) is not None
            (failed,) = together(not made)
            if failed:
                fail(b)
                continue
            state.started.add(b)
            if warm_up(b) and burst(b, FIRST_STEPS):
                out[b] = _summary(backend, b, state)
        # -- rounds over all sizes, then once more for those still unstable
        wanted = {
            b: _steps_wanted(backend, state.marks[b], min_time_s, min_steps, max_steps)
            for b in state.alive()
        }
        for again in (False, True):
            group = state.alive()
            if again and group:
                unstable = together(*(_summary(backend, b, state).unstable for b in group))
                group = [b for b, u in zip(group, unstable, strict=True) if u]
            for r in range(rounds):
                if not group:
                    break
                if on_round is not None:
                    on_round(r + 1 + (rounds if again else 0), rounds)
                for b in group if r % 2 else reversed(group):
                    if b in state.failed:
                        continue
                    extra = max(rounds, wanted[b] - FIRST_STEPS)  # spread over the rounds
                    count = (r + 1) * extra // rounds - r * extra // rounds
                    if burst(b, count):
                        out[b] = _summary(backend, b, state)
        if nosync:
            for b in state.alive():
                if _time_nosync(step, backend, b, state, guarded, together):
                    out[b] = _summary(backend, b, state)
                else:
                    fail(b)
        return out
    except KeyboardInterrupt:
        for b in state.alive():
            if state.marks[b]:
                out[b] = _summary(backend, b, state)
        raise
    finally:
        state.drop()
        step.end()


def _steps_wanted(
    backend: Backend,
    marks: Sequence[tuple[Any, Any, Any]],
    min_time_s: float,
    least: int,
    most: int,
) -> int:
    """Timed steps for about `min_time_s` at this size's pace, within [least, most]."""
    backend.synchronize()
    pace = statistics.median(backend.elapsed_s(a, c) for a, _, c in marks)
    return max(least, min(most, math.ceil(min_time_s / pace) if pace > 0 else most))


def _time_nosync(
    step: TrainStep,
    backend: Backend,
    b: int,
    state: _Sizes,
    guarded: _Guarded,
    together: AnyRank,
) -> bool:
    """Forward+backward under no_sync at `b` (the accumulation passes of DDP/FSDP)."""

    def accumulate() -> list[tuple[Any, Any]]:
        pairs = []
        batch = state.batch(b)
        with step.no_sync():
            for _ in range(min(len(state.marks[b]), NOSYNC_STEPS)):
                start = backend.mark()
                step.forward_backward(batch)
                pairs.append((start, backend.mark()))
        step.optimizer_step()  # clear the accumulated gradients
        backend.synchronize()
        return pairs

    pairs = guarded(accumulate)
    (failed,) = together(guarded.failure is not None)
    if failed or not pairs:
        return False
    state.nosync[b] = low_quantile([backend.elapsed_s(a, c) for a, c in pairs])
    return True


def _summary(backend: Backend, b: int, state: _Sizes) -> StepTiming:
    backend.synchronize()
    marks = state.marks[b]
    fwd_bwd = [backend.elapsed_s(a, m) for a, m, _ in marks]
    optim = [backend.elapsed_s(m, c) for _, m, c in marks]
    totals = [f + o for f, o in zip(fwd_bwd, optim, strict=True)]
    return StepTiming(
        batch_size=b,
        fwd_bwd_s=low_quantile(fwd_bwd),
        optimizer_s=low_quantile(optim),
        step_s=low_quantile(totals),
        spread=relative_spread(totals),
        warmup_steps=state.warmup.get(b, 0),
        timed_steps=len(marks),
        fwd_bwd_nosync_s=state.nosync.get(b),
        cpu_wait=state.waits[b].share,
    )


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
