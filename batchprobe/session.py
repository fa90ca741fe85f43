"""A spec turned into a device, a model, a training step and a prober — and one search.

`open_session(spec)` picks the backend, applies the budget, joins the process group under
torchrun, builds the model on the device and chooses the prober once (in-process, isolated, or
agreed across ranks). The commands' flows (`batchprobe.flows`) drive it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchprobe import launcher
from batchprobe.backends import get_backend
from batchprobe.errors import Problem, SpecError
from batchprobe.estimate import TraceError, Tracer, estimate
from batchprobe.isolate import IsolatedProber
from batchprobe.probe import ProbeProgress, Prober, WatchedProber, drive
from batchprobe.ranks import Dist, Solo, open_ranks
from batchprobe.results import FindMaxResult, ProbeResult, StepTiming
from batchprobe.search import STRATEGIES, SearchContext, candidates, summarize
from batchprobe.sources import Workload, build_workload, quiet_warnings
from batchprobe.spec import Spec
from batchprobe.step import TrainStep
from batchprobe.timing import time_steps
from batchprobe.units import MemorySize, parse_memory_size

if TYPE_CHECKING:
    from batchprobe.backends.base import Backend


@dataclass
class Session:
    spec: Spec
    backend: Backend
    workload: Workload
    step: TrainStep
    ranks: Solo | Dist
    prober: WatchedProber
    _tracer: Tracer | None = field(default=None, repr=False)
    _trace_error: TraceError | None = field(default=None, repr=False)

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

    def time(self, batch_size: int) -> StepTiming:
        """Timed steps; under torchrun the slowest rank's figures, no_sync passes included."""
        timing = time_steps(
            self.step,
            self.backend,
            batch_size,
            min_time_s=self.spec.plan.min_time_s,
            nosync=self.ranks.distributed,
            any_rank=self.ranks.any_rank,
        )
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
        done = drive(
            chosen.make(ctx),
            self.prober,
            limit_bytes=limit_bytes,
            known=known,
            progress=progress,
        )
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
                str(self.backend.device),
                tracer=self._tracer,
            )
            guess = est.max_batch_size or 1
        except TraceError as exc:
            self._trace_error = exc
            why = f"could not trace the model ({exc.op or exc}): searched with probes alone"
        # every rank must start from the same size
        return self.ranks.agree_min(guess), why


def open_session(spec: Spec) -> Session:
    """Pick the device, set the budget, build the model on it; under torchrun (WORLD_SIZE > 1)
    join the process group and wrap the model as train.parallel says."""
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
    backend = get_backend(spec.probe.device, launcher.local_rank())
    backend.set_budget(_budget(spec))
    ranks = open_ranks(backend, parallel, spec.probe.collective_timeout_s)
    with quiet_warnings():
        workload = build_workload(spec, backend.device)
    if ranks.distributed:
        workload.model = workload.model.to(backend.device)
        ranks.shard(workload.model)
    step = TrainStep(workload, spec.train, backend.device, wrap=ranks.wrap(backend))
    if ranks.parallel == "fsdp":
        _materialize_lazy_state(step)
    return Session(spec, backend, workload, step, ranks, _prober(spec, backend, step, ranks))


def _prober(spec: Spec, backend: Backend, step: TrainStep, ranks: Solo | Dist) -> WatchedProber:
    """The one place the prober is chosen: agreed across ranks under torchrun; a child process
    per probe with probe.isolate; else in-process, switching to isolation when the process can
    no longer be trusted (a sticky device error, memory held after a failure)."""
    steps = spec.probe.steps
    if ranks.distributed:
        return WatchedProber(lambda b: ranks.probe(step, backend, b, steps), None)

    def isolated() -> Prober:
        return IsolatedProber(spec, backend.budget_bytes, spec.probe.timeout_s)

    if spec.probe.isolate:
        return WatchedProber(isolated(), None)
    return WatchedProber(lambda b: ranks.probe(step, backend, b, steps), isolated)


def _materialize_lazy_state(step: TrainStep) -> None:
    """FSDP creates persistent buffers in its first forward: one step at batch 1, outside any
    probe, so that probes measure what a step needs rather than a one-time set-up."""
    try:
        step.begin()
        step.train_step(step.make_batch(1))
    finally:
        step.end()


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
