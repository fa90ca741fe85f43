"""A spec turned into a device, a model and a training step — and the flows the commands run.

`open_session(spec)` picks the backend, applies the budget and builds the model on the device.
`Session.find_max()` and `Session.plan()` are what `find-max` and `plan` do; they report progress
through callbacks and stop cleanly on Ctrl-C with what they have.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchprobe.backends import Backend, get_backend
from batchprobe.distributed import Dist, world_size_from_env
from batchprobe.errors import DeviceError, Problem, SpecError
from batchprobe.estimate import (
    CUDA_BLOCK_BYTES,
    Allowance,
    EstimateResult,
    TraceError,
    Tracer,
    estimate,
)
from batchprobe.gpus import lookup, match_device_name
from batchprobe.isolate import IsolatedProber
from batchprobe.noise import NoiseStats
from batchprobe.noise import batches as noise_batches
from batchprobe.noise import measure as measure_noise
from batchprobe.planning import Measurement, Plan, PlanSettings, make_plan, resolve_lr_rule
from batchprobe.probe import (
    FindMaxResult,
    ProbeCallback,
    ProbeResult,
    classify,
    find_max,
    run_probe,
)
from batchprobe.search import Outcome
from batchprobe.sources import Batch, Workload, build_workload, import_object, quiet_warnings
from batchprobe.spec import Spec
from batchprobe.step import TrainStep
from batchprobe.timing import StepTiming, flops_per_sample, time_steps
from batchprobe.units import MemorySize, format_bytes, parse_memory_size

GPU_FRAGMENTATION = 0.05  # allocator rounding past 512 B blocks, fragmentation
GPU_CONTEXT_BYTES = 512 * 1024**2  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator


@dataclass
class PlanProgress:
    """Callbacks for a plan's progress (all optional)."""

    on_probe_start: Callable[[int], None] | None = None
    on_probe: ProbeCallback | None = None
    on_phase: Callable[[str], None] | None = None
    on_candidate: Callable[[int, int, int], None] | None = None  # batch, index, count
    on_timing: Callable[[int, StepTiming], None] | None = None


@dataclass
class PlanRun:
    find_max: FindMaxResult
    plan: Plan | None
    timings: dict[int, StepTiming] = field(default_factory=dict)
    peaks: dict[int, ProbeResult] = field(default_factory=dict)
    flops_per_sample: float | None = None
    flops_fixed: float = 0.0
    headroom_batch_size: int | None = None
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    noise: NoiseRun | None = None  # when the spec has real data


NOISE_WARNING_RATIO = 4  # a global batch this many times B_noise needs 5x the minimal samples


@dataclass
class Session:
    spec: Spec
    backend: Backend
    workload: Workload
    step: TrainStep
    _tracer: Tracer | None = field(default=None, repr=False)
    #: an in-process probe hit a sticky device error: this process cannot run the model any more
    poisoned: bool = False
    #: under torchrun: the process groups and the agreement
    dist: Dist | None = None

    @property
    def limit_bytes(self) -> int | None:
        """What a probe may use: the budget, else the free memory at start (under torchrun, the
        smallest over ranks)."""
        limit = self.backend.budget_bytes or self.backend.free_bytes_at_start
        return self.dist.agree_min(limit) if self.dist is not None else limit

    def probe(self, batch_size: int) -> ProbeResult:
        """One probe; under torchrun on every rank in lockstep, its outcome agreed."""
        steps = self.spec.probe.steps
        if self.dist is not None:
            return self.dist.probe(self.step, self.backend, batch_size, steps)
        return run_probe(self.step, self.backend, batch_size, steps)

    def time(self, batch_size: int) -> StepTiming:
        """Timed steps; under torchrun the slowest rank's figures, no_sync passes included."""
        timing = time_steps(
            self.step,
            self.backend,
            batch_size,
            min_time_s=self.spec.plan.min_time_s,
            nosync=self.dist is not None,
            any_rank=self.dist.any_rank if self.dist is not None else None,
        )
        return self.dist.agree_timing(timing) if self.dist is not None else timing

    def search_prober(self) -> Callable[[int], ProbeResult] | None:
        """What a search runs per size: the agreed probe under torchrun, an isolated one with
        probe.isolate, else None (find_max's own in-process probe)."""
        if self.dist is not None:
            return self.probe
        return self.isolated_prober() if self.spec.probe.isolate else None

    # -- find-max ---------------------------------------------------------------------------
    def find_max(
        self,
        on_start: Callable[[int], None] | None = None,
        on_probe: ProbeCallback | None = None,
    ) -> FindMaxResult:
        p = self.spec.probe
        strategy, guess, notes = p.strategy, None, []
        limit = self.limit_bytes
        # auto: start from the fake-tensor estimate when there is a limit to estimate against
        # (2 real probes when it is right); the predictive search when the model cannot be traced
        if strategy == "estimate" or (strategy == "auto" and limit):
            guess, note = self._estimated_boundary(limit)
            if self.dist is not None and self.dist.parallel == "fsdp":
                # the trace is of the unsharded model: no guide to a rank's share
                guess, note = None, "FSDP: searched with probes alone (the trace is unsharded)"
            if self.dist is not None:  # every rank must start from the same size
                guess = self.dist.agree_min(guess)
            strategy = "estimate" if guess is not None else "predict"
            if note:
                notes.append(note)
        result = find_max(
            self.step,
            self.backend,
            start=p.start,
            cap=p.max_batch_size,
            strategy=strategy,
            steps=p.steps,
            on_start=on_start,
            on_probe=on_probe,
            guess=guess,
            prober=self.search_prober(),
            isolate=self.isolated_prober if self.dist is None else None,
            limit_bytes=limit,
        )
        result.world_size = self.dist.world_size if self.dist is not None else 1
        self.poisoned = self.poisoned or result.poisoned
        result.warnings[:0] = notes
        result.guess = guess
        return result

    def isolated_prober(self) -> IsolatedProber:
        return IsolatedProber(self.spec, self.backend.budget_bytes, self.spec.probe.timeout_s)

    def _estimated_boundary(self, limit: int | None = None) -> tuple[int | None, str]:
        """The fake-tensor estimate of the boundary under `limit` (default: this backend's),
        or why there is none. Traces are kept: a second estimate reuses them."""
        limit = limit or self.limit_bytes
        if not limit:
            return None, "no memory limit known: searched with probes alone"
        if self.dist is not None and self.dist.parallel == "ddp":
            # DDP keeps a flat copy of the gradients in its buckets, outside the traced model
            limit -= sum(
                p.numel() * p.element_size() for p in self.step.parameters() if p.requires_grad
            )
        try:
            if self._tracer is None:
                self._tracer = Tracer(self.spec, self.allowance(fixed=False), self.spec.probe.steps)
            est = estimate(
                self.spec,
                limit,
                self._tracer.allowance,
                str(self.backend.device),
                tracer=self._tracer,
            )
        except TraceError as exc:
            return None, f"could not trace the model ({exc.op or exc}): searched with probes alone"
        return est.max_batch_size or 1, ""

    def allowance(self, fixed: bool = True) -> Allowance:
        """What this device adds to a traced peak: nothing on CPU (the ledger counts exactly what
        the trace counts); on CUDA the allocator's 512-byte blocks, fragmentation and — unless the
        limit already excludes it (`fixed=False`) — the CUDA context and workspaces."""
        if self.backend.device.type == "cpu":
            return Allowance()
        allowance = gpu_allowance(self.spec)
        return allowance if fixed else dataclasses.replace(allowance, context_bytes=0)

    # -- plan -------------------------------------------------------------------------------
    def plan(self, progress: PlanProgress | None = None) -> PlanRun:
        progress = progress or PlanProgress()
        self._check_plan_inputs()
        noise = None
        if self.spec.data is not None and self.dist is None:
            # first, at the model's initial weights: probes and timing train on random inputs
            if progress.on_phase:
                progress.on_phase("noise-scale")
            noise = run_noise(self)
        fm = self.find_max(on_start=progress.on_probe_start, on_probe=progress.on_probe)
        run = PlanRun(find_max=fm, plan=None, noise=noise)
        if fm.max_batch_size is None or fm.interrupted or fm.error is not None:
            run.interrupted = fm.interrupted
            return run
        if self.poisoned:
            run.warnings.append(
                "a sticky device error poisoned this process: the max batch above was found in "
                "isolated probes, but timing needs a healthy process — run plan again"
            )
            return run
        try:
            self._measure(run, progress)
        except KeyboardInterrupt:
            run.interrupted = True
        run.noise = noise
        run.plan = make_plan(self._measurements(run), self.plan_settings(run))
        if run.noise is not None and run.plan.recommended is not None:
            b = run.noise.b_simple
            target = run.plan.recommended.global_batch_size
            if 0 < b < target / NOISE_WARNING_RATIO:
                run.warnings.append(
                    f"the global batch {target} is {target / b:.0f}x the measured gradient noise "
                    f"scale (~{b:,.0f}): far past the critical batch size, doubling it barely "
                    "cuts the optimizer steps and multiplies the samples needed "
                    f"({1 + target / b:.1f}x the fewest; McCandlish et al. 2018)"
                )
        world = self.world_size()
        if world > 1 and world_size_from_env() != world:
            run.warnings.append(
                f"projected for {world} ranks from one device's timings: the gradient all-reduce "
                "is not in the figures (run under torchrun to measure it)"
            )
        return run

    def _check_plan_inputs(self) -> None:
        """Fail before any probe when the plan cannot be made from this spec."""
        if self.workload.inputs.tokens_per_sample is None:
            for key in ("global_tokens", "total_tokens"):
                if getattr(self.spec.plan, key) is not None:
                    raise _token_error(f"plan.{key}")

    def _measure(self, run: PlanRun, progress: PlanProgress) -> None:
        fm = run.find_max
        assert fm.max_batch_size is not None
        for p in fm.probes:
            if p.outcome is Outcome.FIT:
                run.peaks[p.batch_size] = p
        if progress.on_phase:
            progress.on_phase("headroom")
        run.headroom_batch_size = self._headroom_size(run, progress)
        candidates = self.candidates(fm.max_batch_size, run.headroom_batch_size)
        if self.spec.plan.peak_tflops is not None or self._device_peak_flops() is not None:
            if progress.on_phase:
                progress.on_phase("flops")
            run.flops_fixed, run.flops_per_sample = flops_per_sample(self.step)
        for i, b in enumerate(candidates, 1):
            if progress.on_candidate:
                progress.on_candidate(b, i, len(candidates))
            if b not in run.peaks:
                probe = self.probe(b)
                if probe.outcome is not Outcome.FIT:
                    run.warnings.append(
                        f"micro-batch {b} did not fit when measured again ({probe.outcome}); "
                        "skipped"
                    )
                    continue
                run.peaks[b] = probe
            timing = self._time(run, b)
            if timing is None:
                continue
            run.timings[b] = timing
            if progress.on_timing:
                progress.on_timing(b, timing)

    def _time(self, run: PlanRun, b: int) -> StepTiming | None:
        failure = None
        try:
            return self.time(b)
        except Exception as exc:
            failure = classify(exc)
        if failure.outcome is Outcome.ERROR:
            raise RuntimeError(f"timing micro-batch {b} failed: {failure.message}")
        run.warnings.append(
            f"micro-batch {b} fit when probed but hit {failure.outcome} while timed "
            f"({failure.message}); skipped"
        )
        return None

    def _headroom_size(self, run: PlanRun, progress: PlanProgress) -> int | None:
        """Largest tested size whose peak stays within plan.headroom of the limit."""
        limit = self.limit_bytes
        fm = run.find_max
        assert fm.max_batch_size is not None
        if not limit:
            return None
        cap = int(self.spec.plan.headroom * limit)
        inside = [
            b for b, p in run.peaks.items() if p.peak_bytes is not None and p.peak_bytes <= cap
        ]
        lo = max(inside) if inside else self.spec.probe.start
        if lo == fm.max_batch_size:
            return lo
        # The same search, against a budget of headroom x limit, starting from what is known
        # (and from the estimate when find-max started from one).
        guess = self._estimated_boundary(cap)[0] if fm.guess is not None else None
        strategy = "estimate" if guess is not None else "predict"
        saved = self.backend.budget_bytes, self.backend.budget_is_default
        self.backend.set_budget(MemorySize(bytes=cap))
        try:
            inner = find_max(
                self.step,
                self.backend,
                start=lo,
                cap=fm.max_batch_size,
                strategy="doubling" if self.spec.probe.strategy == "doubling" else strategy,
                guess=guess,
                steps=self.spec.probe.steps,
                on_start=progress.on_probe_start,
                on_probe=progress.on_probe,
                known={b: p.peak_bytes for b, p in run.peaks.items() if p.peak_bytes is not None},
                prober=self.search_prober(),
                limit_bytes=cap,
            )
        finally:
            self._restore_budget(*saved)
        for p in inner.probes:
            if p.outcome is Outcome.FIT and not p.reused:
                run.peaks.setdefault(p.batch_size, p)
        if inner.interrupted:
            raise KeyboardInterrupt
        return inner.max_batch_size

    def _restore_budget(self, budget: int | None, is_default: bool) -> None:
        self.backend.set_budget(None if is_default or budget is None else MemorySize(bytes=budget))

    def candidates(self, max_batch: int, headroom_batch: int | None) -> list[int]:
        """plan.candidates if given (capped at max), else powers of two up to the max, the max,
        and the headroom size."""
        if self.spec.plan.candidates:
            return sorted({b for b in self.spec.plan.candidates if b <= max_batch})
        sizes = {2**k for k in range(int(math.log2(max_batch)) + 1)}
        sizes.add(max_batch)
        if headroom_batch:
            sizes.add(headroom_batch)
        return sorted(sizes)

    def _device_peak_flops(self) -> float | None:
        if self.spec.plan.peak_tflops is not None:
            return self.spec.plan.peak_tflops * 1e12
        if self.backend.device.type != "cuda":
            return None
        gpu = match_device_name(self.backend.info().name)
        return gpu.peak_flops(self.spec.train.precision) if gpu else None

    def _measurements(self, run: PlanRun) -> list[Measurement]:
        out = []
        for b, t in sorted(run.timings.items()):
            probe = run.peaks.get(b)
            flops = None
            if run.flops_per_sample is not None:
                flops = run.flops_fixed + run.flops_per_sample * b
            out.append(
                Measurement(
                    micro_batch_size=b,
                    peak_bytes=probe.peak_bytes if probe else None,
                    fwd_bwd_s=t.fwd_bwd_s,
                    optimizer_s=t.optimizer_s,
                    spread=t.spread,
                    flops=flops,
                    fwd_bwd_nosync_s=t.fwd_bwd_nosync_s,
                )
            )
        return out

    def world_size(self) -> int:
        if self.spec.plan.num_gpus is not None:
            return self.spec.plan.num_gpus
        return world_size_from_env()

    def plan_settings(self, run: PlanRun) -> PlanSettings:
        spec, plan = self.spec, self.spec.plan
        tokens = self.workload.inputs.tokens_per_sample
        world = self.world_size()
        note = None
        if plan.global_batch_size is not None:
            target = plan.global_batch_size
        elif plan.global_tokens is not None:
            assert tokens is not None  # checked before probing
            target = math.ceil(plan.global_tokens / tokens)
            if target * tokens != plan.global_tokens:
                note = (
                    f"plan.global_tokens {plan.global_tokens} is not a multiple of seq_len "
                    f"{tokens}: targeting {target} sequences ({target * tokens} tokens)"
                )
        elif plan.base_batch_size is not None:
            target = plan.base_batch_size
            note = f"no plan.global_batch_size: targeting the base batch {target}"
        else:
            assert run.find_max.max_batch_size is not None
            target = run.find_max.max_batch_size * world
            note = (
                f"no plan.global_batch_size or plan.global_tokens: targeting {target} "
                "(the max micro-batch on every rank, no accumulation)"
            )
        total = None
        if plan.dataset_size is not None:
            total = plan.dataset_size * plan.epochs
        elif plan.total_tokens is not None:
            assert tokens is not None  # checked before probing
            total = plan.total_tokens / tokens
        return PlanSettings(
            target_global_batch=target,
            world_size=world,
            tokens_per_sample=tokens,
            limit_bytes=self.limit_bytes,
            capacity_bytes=self.backend.capacity_bytes,
            headroom=plan.headroom,
            base_lr=plan.base_lr,
            base_batch_size=plan.base_batch_size,
            lr_rule=resolve_lr_rule(plan.lr_scaling, spec.train.optimizer.name),
            optimizer=spec.train.optimizer.name,
            total_samples=total,
            epoch_samples=plan.dataset_size,
            peak_flops=self._device_peak_flops(),
            has_batchnorm=self.workload.has_batchnorm,
            target_note=note,
        )


def _token_error(key: str) -> Exception:
    return SpecError([Problem(key, "needs token inputs (inputs.kind: tokens with seq_len)")])


def open_session(spec: Spec) -> Session:
    """Pick the device, set the budget, build the model on it; under torchrun (WORLD_SIZE > 1)
    join the process group and wrap the model as train.parallel says."""
    world = world_size_from_env()
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
    local_rank = os.environ.get("LOCAL_RANK") if world > 1 else None
    backend = get_backend(spec.probe.device, int(local_rank) if local_rank else None)
    backend.set_budget(_budget(spec))
    dist = None
    if world > 1:
        dist = Dist.from_env(backend.device.type, parallel, spec.probe.collective_timeout_s)
    with quiet_warnings():
        workload = build_workload(spec, backend.device)
    wrap = None
    if dist is not None:
        workload.model = workload.model.to(backend.device)
        dist.shard(workload.model)
        wrap = dist.wrap(backend.device)
    step = TrainStep(workload, spec.train, backend.device, wrap=wrap)
    if dist is not None and dist.parallel == "fsdp":
        _materialize_lazy_state(step)
    return Session(spec, backend, workload, step, dist=dist)


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


# --------------------------------------------------------------------------- estimate


@dataclass
class EstimateRun:
    target: str
    capacity_bytes: int
    allowance: Allowance
    result: EstimateResult | None = None
    trace_error: TraceError | None = None
    fallback: FindMaxResult | None = None  # real probes, when the model cannot be traced


def gpu_allowance(spec: Spec) -> Allowance:
    e = spec.estimate
    return Allowance(
        fragmentation=e.fragmentation if e.fragmentation is not None else GPU_FRAGMENTATION,
        context_bytes=e.context_bytes if e.context_bytes is not None else GPU_CONTEXT_BYTES,
        round_to=CUDA_BLOCK_BYTES,
        flash_attention=True,
    )


def estimate_target(spec: Spec) -> tuple[str, int, Allowance]:
    """(what, capacity, allowance): a GPU from the table, a given capacity (a GPU), or the
    configured device — where the CPU's budget is the capacity and nothing is added."""
    e = spec.estimate
    if e.gpu is not None:
        gpu = lookup(e.gpu)
        assert gpu is not None  # checked when the spec was loaded
        return gpu.name, e.capacity or gpu.capacity_bytes, gpu_allowance(spec)
    if e.capacity is not None:
        return f"a GPU with {format_bytes(e.capacity)}", int(e.capacity), gpu_allowance(spec)
    backend = get_backend(spec.probe.device)
    backend.set_budget(spec.probe.memory_budget)
    info = backend.info()
    if backend.device.type == "cpu":
        assert backend.budget_bytes is not None
        return f"cpu budget ({info.name})", backend.budget_bytes, Allowance()
    capacity = backend.budget_bytes or backend.capacity_bytes
    return f"{info.device} ({info.name})", capacity, gpu_allowance(spec)


def run_estimate(
    spec: Spec,
    on_point: Callable[[Any], None] | None = None,
    on_probe: ProbeCallback | None = None,
) -> EstimateRun:
    """Trace with fake tensors; if the model cannot be traced, say which op and fall back to
    real probes on the configured device."""
    target, capacity, allowance = estimate_target(spec)
    run = EstimateRun(target, capacity, allowance)
    extra = spec.estimate.batch_sizes or ()
    try:
        run.result = estimate(
            spec, capacity, allowance, target, batch_sizes=extra, on_point=on_point
        )
    except TraceError as exc:
        if spec.estimate.gpu is not None or spec.estimate.capacity is not None:
            # probes here would answer for this machine, not for the target
            raise DeviceError(
                f"the model cannot be traced with fake tensors ({exc.op or exc}), and {target} "
                "is not here to probe: run `batchprobe find-max` on it"
            ) from None
        run.trace_error = exc
        session = open_session(spec)
        run.fallback = session.find_max(on_probe=on_probe)
    return run


# --------------------------------------------------------------------------- noise scale

SYNTHETIC_REFUSAL = (
    "the gradient noise scale needs real data (a data: section with source: pkg.module:factory). "
    "Random synthetic inputs carry no signal to learn: their gradient is pure noise, so B_noise "
    "would measure nothing about your task"
)


@dataclass
class NoiseRun:
    stats: NoiseStats
    seconds: float
    device: Any

    @property
    def b_simple(self) -> float:
        return self.stats.b_simple()


def data_batches(session: Session, batch_size: int) -> Iterator[Batch]:
    """Real batches from the spec's data: section, wired like the spec's inputs."""
    data = session.spec.data
    if data is None:
        raise SpecError([Problem("data", SYNTHETIC_REFUSAL)])
    base = Path(session.spec.origin).parent if session.spec.origin else None
    source = import_object(data.source, "data.source", base)
    collate = import_object(data.collate, "data.collate", base) if data.collate else None
    return noise_batches(
        source, batch_size, session.backend.device, data.kwargs, session.workload.adapt, collate
    )


def run_noise(
    session: Session, on_step: Callable[[int, NoiseStats], None] | None = None
) -> NoiseRun:
    """B_simple from the spec's data: micro-batch gradients of noise.small_batch_size, their
    accumulated mean as the big batch."""
    import time as _time

    n = session.spec.noise
    if session.dist is not None:
        raise SpecError([Problem("noise", "noise-scale runs on one device, not under torchrun")])
    started = _time.perf_counter()
    source = data_batches(session, n.small_batch_size)
    stats = measure_noise(
        session.step,
        source,
        n.small_batch_size,
        n.accumulation,
        n.steps,
        n.warmup_steps,
        on_step,
    )
    return NoiseRun(stats, _time.perf_counter() - started, session.backend.info())
