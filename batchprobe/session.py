"""A spec turned into a device, a model, a training step and a prober — and one search.

`open_session(spec)` picks the backend, applies the budget, joins the process group under
torchrun, builds the model on the device, warms it up, and chooses the prober once (in-process,
isolated, or agreed across ranks). With isolated probes the parent stays off the device: a child
describes it, and the parent builds the model itself only when it has to run it (timing, the
noise scale), once the children are done. The commands' flows (`batchprobe.flows`) drive it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchprobe import launcher
from batchprobe.backends import get_backend
from batchprobe.backends.base import DeviceView
from batchprobe.errors import Problem, SpecError
from batchprobe.estimate import TraceError, Tracer
from batchprobe.isolate import IsolatedProber
from batchprobe.memory import OutOfTime
from batchprobe.probe import Driven, ProbeProgress, Prober, WatchedProber, drive, warm_up
from batchprobe.ranks import Dist, Solo, open_ranks
from batchprobe.results import (
    Failure,
    FindMaxResult,
    PeakBreakdown,
    ProbeResult,
    StepTiming,
    TraceCheck,
)
from batchprobe.search import (
    STRATEGIES,
    Observation,
    Outcome,
    Prior,
    SearchContext,
    StrategyInfo,
    candidates,
    iter_once,
    limit_fell,
    make_strategy,
    summarize,
    voided,
)
from batchprobe.sources import Workload, build_workload, quiet_warnings
from batchprobe.spec import Spec
from batchprobe.step import TrainStep
from batchprobe.timing import TimingProgress, time_sizes
from batchprobe.units import MemorySize, format_bytes, parse_memory_size

if TYPE_CHECKING:
    from batchprobe.backends.base import Backend


#: tracing for the prior may take this many times the warm-up (its full steps at batch 1): about
#: the probes a right prior saves (each costs at least that much)
TRACE_PROBES = 4
TRACE_MIN_S = 10.0  # ... and at least this long: a probe also opens and settles the device, and
# the warm-up at batch 1 is far cheaper than a probe near the boundary (a busy machine slows both)


@dataclass
class Session:
    spec: Spec
    backend: Backend | DeviceView
    workload: Workload
    ranks: Solo | Dist
    prober: WatchedProber
    _step: TrainStep | None = field(default=None, repr=False)
    #: the warm-up: full steps at batch 1 before any probe (agreed across ranks); a search
    #: learns from it and answers batch 1 with it
    warm: ProbeResult | None = None
    _tracer: Tracer | None = field(default=None, repr=False)
    _trace_error: TraceError | None = field(default=None, repr=False)
    _traced: bool = field(default=False, repr=False)  # a search has traced for its prior
    _budget_said: bool = field(default=False, repr=False)  # a budget over the room was said

    @property
    def isolated(self) -> bool:
        """Probes run in child processes (the parent holds no device memory while they do)."""
        return isinstance(self.backend, DeviceView) or self.spec.probe.isolate

    @property
    def step(self) -> TrainStep:
        """The training step on the device (with isolated probes, built on first use)."""
        if self._step is None:
            self.backend, self.workload, self._step, _ = _on_device(self.spec, self.ranks)
        return self._step

    @property
    def device(self) -> Backend:
        """The device backend, opened in this process (with isolated probes, on first use)."""
        step = self.step
        assert not isinstance(self.backend, DeviceView), step
        return self.backend

    @property
    def limit_bytes(self) -> int | None:
        """What a probe may use: the budget, else the free memory at start (under torchrun, the
        smallest over ranks)."""
        return self.ranks.agree_min(self.backend.budget_bytes or self.backend.free_bytes_at_start)

    @property
    def poisoned(self) -> bool:
        """An in-process probe hit a sticky device error: this process cannot run the model."""
        return self.prober.poisoned

    def probe(self, batch_size: int) -> ProbeResult:
        """One probe through the session's prober (agreed across ranks under torchrun)."""
        return self.prober(batch_size)

    def time(
        self,
        sizes: Sequence[int],
        progress: TimingProgress | None = None,
        into: dict[int, StepTiming | Failure] | None = None,
    ) -> dict[int, StepTiming | Failure]:
        """Timed steps per size, or how a step failed while timed (agreed across ranks: every
        rank returns the same; under torchrun the slowest rank's figures, no_sync passes
        included). The sizes are timed together in interleaved rounds (`timing.time_sizes`);
        a compiled model one size at a time, each with its own graph, as a run compiles once.
        `into` is filled as sizes finish, and holds what was measured when Ctrl-C comes."""
        out: dict[int, StepTiming | Failure] = {} if into is None else into
        groups = [[b] for b in sizes] if self.spec.train.compile else [list(sizes)]
        done = 0
        for group in groups:
            _time_group(self, group, done, len(sizes), progress, out)
            done += len(group)
        return out

    def search(
        self,
        *,
        limit_bytes: int | None = None,
        strategy: str | None = None,
        start: int | None = None,
        cap: int | None = None,
        known: dict[int, ProbeResult] | None = None,
        progress: ProbeProgress | None = None,
    ) -> FindMaxResult:
        """The largest size that fits, searched with real probes: against the session's limit,
        or a stricter `limit_bytes` (completed probes whose peak is above it count as not
        fitting). The strategy is the spec's unless given; `auto` and missing inputs are
        resolved here, the one place (estimate needs a trace, predict a limit)."""
        p = self.spec.probe
        limit = limit_bytes or self.limit_bytes
        seen: tuple[tuple[int, Observation], ...] = ()
        if self.warm is not None:  # a measurement (the limit it left is read again below)
            warm = self.warm.observation(limit_bytes)
            seen = (
                (1, dataclasses.replace(warm, limit_bytes=None, limit_moves_with_probes=False)),
            )
        ctx = SearchContext(start or p.start, cap or self.cap, limit, seen=seen)
        requested = strategy or p.strategy
        notes: list[str] = []
        started = time.perf_counter()
        for name in candidates(requested):
            chosen = STRATEGIES[name]
            if chosen.needs_prior and ctx.prior is None:
                prior, why = self.prior(limit)
                ctx = dataclasses.replace(ctx, prior=prior)
                notes += [why] if why else []
                if settled_after_first_trace(self):
                    limit = limit_bytes or self.limit_bytes
                    ctx = dataclasses.replace(ctx, limit_bytes=limit)
            if chosen.usable(ctx):
                break
        notes += _budget_over_room(self)
        traced = time.perf_counter() - started
        warned = len(self.prober.warnings)
        watch = _RoomWatch(self.backend, self.prober)
        if self.warm is not None and self.warm.outcome is Outcome.FIT:
            # full steps at batch 1, measured: batch 1 needs no other probe
            known = {1: dataclasses.replace(self.warm, retained_bytes=0), **(known or {})}
        done = drive(
            chosen.make(ctx), watch, limit_bytes=limit_bytes, known=known, progress=progress
        )
        told = ctx.limit_bytes
        watch.void = voided(done.observations, told)  # fits the device said no longer fit
        notes += watch.recheck(done, ctx, limit_bytes, progress)
        counted = [o for i, o in enumerate(done.observations) if i not in watch.void]
        summary = summarize(counted, ctx.cap, interrupted=done.interrupted, limit_bytes=told)
        return FindMaxResult(
            search=summary,
            probes=done.probes,
            device=self.backend.info(),
            budget_bytes=self.backend.budget_bytes,
            limit_bytes=limit,
            strategy=chosen.name,
            seconds=time.perf_counter() - started,
            warnings=[*notes, *self.prober.warnings[warned:]],
            guess=ctx.guess if chosen.needs_prior else None,
            poisoned=self.prober.poisoned,
            world_size=self.ranks.world_size,
            trace_check=_trace_check(self._tracer, ctx.prior, chosen, done.probes, told),
            trace_seconds=traced,
            explained=None if done.interrupted else explain(self, summary.best, done.probes),
            axis=p.axis,
            held_batch_size=p.batch_size,
        )

    @property
    def cap(self) -> int:
        """The largest size a search may try: probe.max_batch_size; along seq_len, also the
        model's maximum positions."""
        p = self.spec.probe
        longest = self.workload.inputs.max_seq_len if p.axis == "seq_len" else None
        return min(p.max_batch_size, longest or p.max_batch_size)

    def tracer(self) -> Tracer:
        """The fake-tensor tracer of this spec, as the device runs it (raises TraceError when
        the model cannot be traced; kept, with its traces, for the session)."""
        if self._trace_error is not None:
            raise self._trace_error
        if self._tracer is None:
            # the limit is what is free once the context exists: no fixed allowance
            allowance = self.backend.estimate_target(self.spec.estimate)[2]
            allowance = dataclasses.replace(allowance, context_bytes=0)
            try:
                self._tracer = Tracer(self.spec, allowance, self.spec.probe.steps)
            except TraceError as exc:
                self._trace_error = exc
                raise
        return self._tracer

    def prior(self, limit: int | None) -> tuple[Prior | None, str]:
        """What the fake-tensor trace says memory is at each size, or why there is nothing to
        go on. Tracing stops once it costs more than the probes it would save (a few times
        the warm-up's steps). Traces, and a failure to trace, are kept for the next search."""
        if not limit:
            return None, "no memory limit known: searched with probes alone"
        if self.ranks.parallel == "fsdp":
            # the trace is of the unsharded model: no guide to a rank's share
            return None, "FSDP: searched with probes alone (the trace is unsharded)"
        extra = 0
        if self.ranks.parallel == "ddp":
            # DDP keeps a flat copy of the gradients in its buckets, outside the traced model
            extra = sum(
                p.numel() * p.element_size() for p in self.step.parameters() if p.requires_grad
            )
        budget = max(TRACE_MIN_S, TRACE_PROBES * (self.warm.seconds if self.warm else 0.0))
        prior: Prior | None = None
        why = ""
        try:
            deadline = time.perf_counter() + budget
            prior = self.tracer().prior(limit, extra, deadline=deadline, cap=self.cap)
        except TraceError as exc:
            self._trace_error = exc
            why = f"could not trace the model ({exc.op or exc}): searched with probes alone"
        except OutOfTime:
            why = (
                f"tracing took longer than {budget:.1f} s, more than the probes it would save: "
                "searched with probes alone"
            )
        # every rank must search alike: the traces are the same on each, unless one ran out
        (missing,) = self.ranks.any_rank(prior is None)
        return (None, why) if missing else (prior, why)


def explain(
    session: Session, batch_size: int | None, probes: Sequence[ProbeResult] = ()
) -> PeakBreakdown | None:
    """What filled the peak at `batch_size`: from its probe where the backend saw each
    storage (the CPU's ledger), else from a trace at that size (a GPU's allocator sees
    blocks, not tensors); None when neither can say (FSDP's trace is unsharded)."""
    if batch_size is None:
        return None
    measured = next(
        (p.explained for p in probes if p.batch_size == batch_size and p.explained), None
    )
    if measured is not None or session.ranks.parallel == "fsdp":
        return measured
    try:
        return session.tracer().trace(batch_size).explained
    except Exception:  # an explanation is a bonus: nothing that fails here fails the search
        return None


def _trace_check(
    tracer: Tracer | None,
    prior: Prior | None,
    strategy: StrategyInfo,
    probes: list[ProbeResult],
    limit_bytes: int | None = None,
) -> TraceCheck | None:
    """The trace against the first probe that ran (a strategy that searched from it)."""
    first = next((p for p in probes if not p.reused), None)
    if prior is None or first is None or not strategy.needs_prior:
        return None
    b = first.batch_size

    def traced_ops() -> dict[str, int] | None:
        if tracer is None:
            return None
        try:
            return tracer.trace(b).op_bytes
        except (TraceError, OutOfTime):
            return None

    return check_trace(int(max(prior.flat.at(b), prior.at(b))), first, traced_ops, limit_bytes)


def check_trace(
    traced_bytes: int,
    probe: ProbeResult,
    traced_ops: Callable[[], dict[str, int] | None],
    limit_bytes: int | None = None,
) -> TraceCheck | None:
    """A trace's bytes at a size against a real probe there: its peak, or what its failed
    allocation needed. When they differ, the op: the one that failed, else (the CPU sees ops)
    the op whose bytes differ from the trace's (`traced_ops`, asked only then) by most."""
    b = probe.batch_size
    if probe.outcome is Outcome.FIT and probe.peak_bytes:
        check = TraceCheck(b, traced_bytes, probe.peak_bytes, limit_bytes=limit_bytes)
    elif probe.need_bytes:
        check = TraceCheck(
            b, traced_bytes, probe.need_bytes, True, probe.failed_op, limit_bytes=limit_bytes
        )
    else:
        return None
    if check.agreed or check.op or not probe.op_bytes:
        return check
    ops = traced_ops()
    if ops is None:
        return check
    diffs = {op: n - ops.get(op, 0) for op, n in probe.op_bytes.items()}
    under = check.ratio > 1
    op = max(diffs, key=lambda o: diffs[o] if under else -diffs[o], default=None)
    return dataclasses.replace(check, op=op)


class _RoomWatch:
    """A prober that notices other processes taking device memory during a search: sizes tried
    before and after ran with different room. When the room fell, a best size measured before
    is tried again, and the search goes on below it if it no longer fits — the answer holds for
    the device as it is now."""

    def __init__(self, backend: Backend | DeviceView, prober: Prober) -> None:
        self.backend = backend
        self.prober = prober
        self.start = _available(backend)
        self.probes = 0
        self.fell_at: int | None = None  # probes run when the fall was first seen
        self.fall = 0
        #: observations (indices) of sizes that fit before the limit fell and that a reading of
        #: the limit or a failure since proved no longer fit: not fits of the answer, and not
        #: probed again
        self.void: set[int] = set()

    def __call__(self, batch_size: int) -> ProbeResult:
        now = _available(self.backend)
        if self.start is not None and now is not None and self.fell_at is None:
            threshold = max(16 * 1024**2, self.backend.capacity_bytes // 100)
            if self.start - now > threshold:
                self.fell_at, self.fall = self.probes, self.start - now
        self.probes += 1
        return self.prober(batch_size)

    def recheck(
        self,
        done: Driven,
        ctx: SearchContext,
        limit_bytes: int | None,
        progress: ProbeProgress | None,
    ) -> list[str]:
        if done.interrupted:
            return []
        if self.fell_at is not None:
            notes = [
                f"free device memory fell by {format_bytes(self.fall)} during the search "
                f"(another process on the device?): probes from #{self.fell_at + 1} on had less "
                "room"
            ]
            # probes answered from earlier ones never came here: count the ones that ran
            ran = [i for i, p in enumerate(done.probes) if not p.reused]
            fell_at = ran[self.fell_at] if self.fell_at < len(ran) else len(done.probes)
            proven: int | None = None  # nothing says by how much
        elif (fell := limit_fell(done.observations)) is not None:
            fell_at, (b, need, size, peak) = fell
            notes = [
                f"batch {b} failed needing {format_bytes(need)}, less than the "
                f"{format_bytes(peak)} batch {size} used when it fit: the limit fell during the "
                "search"
            ]
            proven = need - 1  # the limit since: below what that failure needed
        else:
            return []
        fits = [
            i
            for i, (_, o) in enumerate(done.observations)
            if o.outcome is Outcome.FIT and i not in self.void
        ]
        best = max(fits, key=lambda i: done.observations[i][0], default=None)
        if best is None or best >= fell_at:
            return notes  # the answer was found after the fall
        size, seen = done.observations[best]
        unprobed = proven is not None and (seen.peak_bytes or 0) > proven
        if proven is not None and unprobed:
            # what failed since proves it no longer fits (memory at a size does not change):
            # no probe to learn that again; the fits it voids are no part of the answer
            self.void |= {
                i
                for i, (_, o) in enumerate(done.observations[:fell_at])
                if o.outcome is Outcome.FIT and (o.peak_bytes or 0) > proven
            }
        else:
            again = drive(iter_once(size), self, limit_bytes=limit_bytes, progress=progress)
            done.probes += again.probes
            done.observations += again.observations
            if again.observations and again.observations[0][1].outcome is Outcome.FIT:
                return [*notes, f"micro-batch {size} still fits after the fall"]
        # the warm-up is a fit measured before the search: kept too, if what failed since
        # proves its peak still fits
        after = _since_the_fall([*ctx.seen, *done.observations], fell_at + len(ctx.seen))
        below = dataclasses.replace(ctx, cap=size - 1, start=min(ctx.start, size - 1), seen=after)
        name = "estimate" if below.prior is not None else "predict"
        if size > 1:
            rest = drive(
                make_strategy(name, below), self, limit_bytes=limit_bytes, progress=progress
            )
            done.probes += rest.probes
            done.observations += rest.observations
            fits_below = [b for b, o in rest.observations if o.outcome is Outcome.FIT]
            if unprobed and not rest.interrupted and max(fits_below, default=0) == size - 1:
                # the answer is next to a size known not to fit only from bytes: tried, so
                # that max + 1 is a tested size as every answer's is
                last = drive(iter_once(size), self, limit_bytes=limit_bytes, progress=progress)
                done.probes += last.probes
                done.observations += last.observations
        return [*notes, f"micro-batch {size} no longer fits: searched again below it"]


def _since_the_fall(
    observations: Sequence[tuple[int, Observation]], fell_at: int
) -> tuple[tuple[int, Observation], ...]:
    """What informs the search below a fall: everything seen since, and the fits before it that
    are still true — those whose peak is at most what the limit was proven to allow since (the
    bytes live when a later allocation failed, a later fit's peak). They give the line and a
    floor, so a search below a small fall does not start again from batch 1."""
    after = tuple(observations[fell_at:])
    proven = max(
        [o.live_bytes or 0 for _, o in after if o.outcome is Outcome.OOM]
        + [o.peak_bytes or 0 for _, o in after if o.outcome is Outcome.FIT],
        default=0,
    )
    still = tuple(
        (b, o)
        for b, o in observations[:fell_at]
        if o.outcome is Outcome.FIT and o.peak_bytes and o.peak_bytes <= proven
    )
    return still + after


def _available(backend: Backend | DeviceView) -> int | None:
    """Memory available now, or None when the device cannot say (a sticky error poisons every
    call; the prober deals with that)."""
    try:
        return backend.available_now()
    except Exception:
        return None


def open_session(spec: Spec) -> Session:
    """Pick the device, set the budget, build the model on it and warm it up; under torchrun
    (WORLD_SIZE > 1) join the process group and wrap the model as train.parallel says."""
    world = launcher.world_size()
    parallel = spec.train.parallel
    if parallel == "auto":
        parallel = "ddp" if world > 1 else "none"
    if parallel != "none" and world == 1:
        raise SpecError(
            [Problem("train.parallel", f"{parallel} needs several ranks: run under torchrun")]
        )
    if world > 1 and spec.probe.isolate:
        raise SpecError(
            [Problem("probe.isolate", "isolated probes are not supported under torchrun")]
        )
    if spec.probe.isolate:
        children = IsolatedProber(spec, _budget(spec), spec.probe.timeout_s)
        view = children.describe()
        with quiet_warnings():
            workload = build_workload(spec, "meta")  # what the model is, on no device
        return Session(spec, view, workload, Solo(), WatchedProber(children, None))
    backend = get_backend(spec.probe.device, launcher.local_rank())
    apply_budget(spec, backend)
    ranks = open_ranks(backend, parallel, spec.probe.collective_timeout_s)
    backend, workload, step, warm = _on_device(spec, ranks, backend)
    budget = MemorySize(bytes=backend.budget_bytes) if backend.budget_bytes else None

    def isolated() -> Prober:  # where in-process probing can no longer be trusted
        return IsolatedProber(spec, budget, spec.probe.timeout_s)

    prober = WatchedProber(
        lambda b: ranks.probe(step, backend, b, spec.probe.steps),
        None if ranks.distributed else isolated,
    )
    prober.warnings.extend(ranks.notes)  # said with the first search's results
    return Session(spec, backend, workload, ranks, prober, _step=step, warm=warm)


def settled_after_first_trace(session: Session) -> bool:
    """The first trace loads code of its own (under an rlimit, mapped where the probes'
    tensors would go): what is free to the probes is read again, once. True when it was."""
    if session._traced or isinstance(session.backend, DeviceView):
        return False
    session._traced = True
    session.backend.settle()
    return True


def _budget_over_room(session: Session) -> list[str]:
    """A budget in bytes is checked against the capacity before the model exists; where
    building and warming it up takes room (an rlimit counts what they map), it may no longer
    be there: said once, since the budget then holds nothing back and its percentages
    mislead."""
    budget, backend = _budget(session.spec), session.backend
    if session._budget_said or isinstance(backend, DeviceView):
        return []
    if budget is None or budget.bytes is None or budget.bytes <= backend.capacity_bytes:
        return []
    session._budget_said = True
    where = backend.info().details.get("capacity")
    return [
        f"probe.memory_budget ({format_bytes(budget.bytes)}) is more than the room left once "
        f"the model was built and warmed up ({format_bytes(backend.capacity_bytes)}"
        f"{f', set by {where}' if where else ''}): the search follows that limit, and the "
        "budget holds nothing back"
    ]


def _on_device(
    spec: Spec, ranks: Solo | Dist, backend: Backend | None = None
) -> tuple[Backend, Workload, TrainStep, ProbeResult]:
    """The model on the device, wrapped for the ranks, warmed up: full steps at batch 1, before
    any probe (agreed under torchrun), so that what a process creates once is in the baseline
    rather than in the first probe. Returns the warm-up's result too: a measured batch 1."""
    if backend is None:
        backend = get_backend(spec.probe.device, launcher.local_rank())
        apply_budget(spec, backend)
    backend.configure(spec.train)
    with quiet_warnings():
        workload = build_workload(spec, backend.device)
    if ranks.distributed:
        workload.model = workload.model.to(backend.device)
        ranks.shard(workload.model)
    step = TrainStep(
        workload,
        spec.train,
        backend.device,
        wrap=ranks.wrap(backend),
        optimizer_defaults=backend.optimizer_defaults(),
    )
    if isinstance(ranks, Dist) and ranks.parallel == "fsdp":
        ranks.rebuild = lambda: _reshard(spec, ranks, backend, step)
    warm = warm_up(lambda b: ranks.probe(step, backend, b, spec.probe.steps), backend)
    return backend, workload, step, warm


def _reshard(spec: Spec, ranks: Dist, backend: Backend, step: TrainStep) -> None:
    """FSDP's units hold the mesh they were sharded on: after the data group is replaced, a
    fresh model (the same seeded weights) sharded on the new one."""
    with quiet_warnings():
        model = build_workload(spec, backend.device).model.to(backend.device)
    ranks.shard(model)
    step.replace_model(model)


def apply_budget(spec: Spec, backend: Backend) -> None:
    """The spec's budget on the backend; a budget in bytes above what the device can take is
    refused, naming the key (a budget the device cannot honour would only end in the OOM
    killer, or in a search told a limit that is not there)."""
    budget = _budget(spec)
    if budget is not None and budget.bytes is not None and budget.bytes > backend.capacity_bytes:
        details = backend.info().details
        where = f", set by {details['capacity']}" if "capacity" in details else ""
        raise SpecError(
            [
                Problem(
                    "probe.memory_budget",
                    f"{format_bytes(budget.bytes)} is more than this device can take "
                    f"({format_bytes(backend.capacity_bytes)}{where}): leave it unset for the "
                    "whole device, or give a fraction such as 0.9",
                )
            ]
        )
    backend.set_budget(budget)


def _budget(spec: Spec) -> MemorySize | None:
    """The spec's budget, unless BATCHPROBE_MEMORY_BUDGET overrides it for this process (one
    rank, one node of a mixed cluster)."""
    override = os.environ.get("BATCHPROBE_MEMORY_BUDGET")
    if not override:
        return spec.probe.memory_budget
    try:
        return parse_memory_size(override)
    except ValueError as exc:
        raise SpecError(
            [Problem("BATCHPROBE_MEMORY_BUDGET", str(exc), source="environment")]
        ) from None


def _time_group(
    session: Session,
    group: list[int],
    offset: int,
    count: int,
    progress: TimingProgress | None,
    out: dict[int, StepTiming | Failure],
) -> None:
    """Time `group` (sizes `offset`+1... of `count`) and agree the figures across ranks."""

    def on_size(b: int, i: int, _: int) -> None:
        if progress is not None:
            progress.candidate(b, offset + i, count)

    raw: dict[int, StepTiming | Failure] = {}
    try:
        time_sizes(
            session.step,
            session.device,
            group,
            min_time_s=session.spec.plan.min_time_s,
            nosync=session.ranks.distributed,
            any_rank=session.ranks.any_rank,
            agree_failure=session.ranks.agree_failure,
            on_size=on_size,
            on_round=progress.round if progress is not None else None,
            into=raw,
        )
    except KeyboardInterrupt:
        out.update(raw)  # as measured here: no collective after Ctrl-C
        raise
    for b, t in raw.items():
        if isinstance(t, Failure):  # agreed already, when it happened
            out[b] = t
            continue
        out[b] = agreed = session.ranks.agree_timing(t)
        if progress is not None:
            progress.timed(b, agreed)
