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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchprobe import launcher
from batchprobe.backends import get_backend
from batchprobe.backends.base import DeviceView
from batchprobe.errors import Problem, SpecError
from batchprobe.estimate import TraceError, Tracer, estimate
from batchprobe.isolate import IsolatedProber
from batchprobe.probe import Driven, ProbeProgress, Prober, WatchedProber, drive, warm_up
from batchprobe.ranks import Dist, Solo, open_ranks
from batchprobe.results import Failure, FindMaxResult, ProbeResult, StepTiming
from batchprobe.search import STRATEGIES, Outcome, SearchContext, candidates, iter_once, summarize
from batchprobe.sources import Workload, build_workload, quiet_warnings
from batchprobe.spec import Spec
from batchprobe.step import TrainStep
from batchprobe.timing import time_steps
from batchprobe.units import MemorySize, format_bytes, parse_memory_size

if TYPE_CHECKING:
    from batchprobe.backends.base import Backend


@dataclass
class Session:
    spec: Spec
    backend: Backend | DeviceView
    workload: Workload
    ranks: Solo | Dist
    prober: WatchedProber
    _step: TrainStep | None = field(default=None, repr=False)
    _tracer: Tracer | None = field(default=None, repr=False)
    _trace_error: TraceError | None = field(default=None, repr=False)

    @property
    def isolated(self) -> bool:
        """Probes run in child processes (the parent holds no device memory while they do)."""
        return isinstance(self.backend, DeviceView) or self.spec.probe.isolate

    @property
    def step(self) -> TrainStep:
        """The training step on the device (with isolated probes, built on first use)."""
        if self._step is None:
            self.backend, self.workload, self._step = _on_device(self.spec, self.ranks)
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

    def time(self, batch_size: int) -> StepTiming | Failure:
        """Timed steps, or how a step failed while timed (agreed across ranks: every rank
        returns the same); under torchrun the slowest rank's figures, no_sync passes included."""
        timing = time_steps(
            self.step,
            self.device,
            batch_size,
            min_time_s=self.spec.plan.min_time_s,
            nosync=self.ranks.distributed,
            any_rank=self.ranks.any_rank,
        )
        if isinstance(timing, Failure):
            return self.ranks.agree_failure(timing)
        return self.ranks.agree_timing(timing)

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
        ctx = SearchContext(start or p.start, cap or p.max_batch_size, limit)
        requested = strategy or p.strategy
        notes: list[str] = []
        for name in candidates(requested):
            chosen = STRATEGIES[name]
            if chosen.needs_guess:
                guess, why = self.estimated_boundary(limit)
                ctx = dataclasses.replace(ctx, guess=guess)
                notes += [why] if why else []
            if chosen.usable(ctx):
                break
        warned = len(self.prober.warnings)
        started = time.perf_counter()
        watch = _RoomWatch(self.backend, self.prober)
        done = drive(
            chosen.make(ctx), watch, limit_bytes=limit_bytes, known=known, progress=progress
        )
        notes += watch.recheck(done, ctx, limit_bytes, progress)
        return FindMaxResult(
            search=summarize(done.observations, ctx.cap, interrupted=done.interrupted),
            probes=done.probes,
            device=self.backend.info(),
            budget_bytes=self.backend.budget_bytes,
            limit_bytes=limit,
            strategy=chosen.name,
            seconds=time.perf_counter() - started,
            warnings=[*notes, *self.prober.warnings[warned:]],
            guess=ctx.guess if chosen.needs_guess else None,
            poisoned=self.prober.poisoned,
            world_size=self.ranks.world_size,
        )

    def estimated_boundary(self, limit: int | None) -> tuple[int | None, str]:
        """The fake-tensor estimate of the boundary under `limit`, or why there is none. Traces
        (and a failure to trace) are kept: a second estimate reuses them."""
        if not limit:
            return None, "no memory limit known: searched with probes alone"
        if self.ranks.parallel == "fsdp":
            # the trace is of the unsharded model: no guide to a rank's share
            return None, "FSDP: searched with probes alone (the trace is unsharded)"
        if self.ranks.parallel == "ddp":
            # DDP keeps a flat copy of the gradients in its buckets, outside the traced model
            limit -= sum(
                p.numel() * p.element_size() for p in self.step.parameters() if p.requires_grad
            )
        guess: int | None = None
        why = ""
        try:
            if self._trace_error is not None:
                raise self._trace_error
            if self._tracer is None:
                # the limit is what is free once the context exists: no fixed allowance
                allowance = self.backend.estimate_target(self.spec.estimate)[2]
                allowance = dataclasses.replace(allowance, context_bytes=0)
                self._tracer = Tracer(self.spec, allowance, self.spec.probe.steps)
            est = estimate(
                self.spec,
                limit,
                self._tracer.allowance,
                self.backend.info().device,
                tracer=self._tracer,
            )
            guess = est.max_batch_size or 1
        except TraceError as exc:
            self._trace_error = exc
            why = f"could not trace the model ({exc.op or exc}): searched with probes alone"
        # every rank must start from the same size
        return self.ranks.agree_min(guess), why


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
        self.fell_at: int | None = None  # probes made when the fall was first seen
        self.fall = 0

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
        if self.fell_at is None or done.interrupted:
            return []
        notes = [
            f"free device memory fell by {format_bytes(self.fall)} during the search (another "
            f"process on the device?): probes from #{self.fell_at + 1} on had less room"
        ]
        fits = [i for i, (_, o) in enumerate(done.observations) if o.outcome is Outcome.FIT]
        best = max(fits, key=lambda i: done.observations[i][0], default=None)
        if best is None or best >= self.fell_at:
            return notes
        size = done.observations[best][0]
        again = drive(iter_once(size), self, limit_bytes=limit_bytes, progress=progress)
        done.probes += again.probes
        done.observations += again.observations
        if again.observations and again.observations[0][1].outcome is Outcome.FIT:
            return [*notes, f"micro-batch {size} still fits after the fall"]
        below = dataclasses.replace(ctx, cap=size - 1, start=min(ctx.start, size - 1), guess=None)
        if size > 1:
            rest = drive(
                STRATEGIES["doubling"].make(below), self, limit_bytes=limit_bytes, progress=progress
            )
            done.probes += rest.probes
            done.observations += rest.observations
        return [*notes, f"micro-batch {size} no longer fits: searched again below it"]


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
    backend.set_budget(_budget(spec))
    ranks = open_ranks(backend, parallel, spec.probe.collective_timeout_s)
    backend, workload, step = _on_device(spec, ranks, backend)
    budget = MemorySize(bytes=backend.budget_bytes) if backend.budget_bytes else None

    def isolated() -> Prober:  # where in-process probing can no longer be trusted
        return IsolatedProber(spec, budget, spec.probe.timeout_s)

    prober = WatchedProber(
        lambda b: ranks.probe(step, backend, b, spec.probe.steps),
        None if ranks.distributed else isolated,
    )
    prober.warnings.extend(ranks.notes)  # said with the first search's results
    return Session(spec, backend, workload, ranks, prober, _step=step)


def _on_device(
    spec: Spec, ranks: Solo | Dist, backend: Backend | None = None
) -> tuple[Backend, Workload, TrainStep]:
    """The model on the device, wrapped for the ranks, warmed up: one step at the start size,
    outside any probe (its outcome agreed under torchrun), so that what a process creates once
    is in the baseline rather than in the first probe."""
    if backend is None:
        backend = get_backend(spec.probe.device, launcher.local_rank())
        backend.set_budget(_budget(spec))
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
    warm_up(lambda b: ranks.probe(step, backend, b, 1), backend)
    return backend, workload, step


def _reshard(spec: Spec, ranks: Dist, backend: Backend, step: TrainStep) -> None:
    """FSDP's units hold the mesh they were sharded on: after the data group is replaced, a
    fresh model (the same seeded weights) sharded on the new one."""
    with quiet_warnings():
        model = build_workload(spec, backend.device).model.to(backend.device)
    ranks.shard(model)
    step.replace_model(model)


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
