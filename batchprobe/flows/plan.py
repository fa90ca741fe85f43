"""plan: find-max, the headroom size, timed candidates, and the plan that follows from them.

1. the gradient noise scale, when the spec has real data, at the model's initial weights: first,
   since in-process probes train the model on random inputs (with isolated probes, after them:
   the children's training never touches this process's model);
2. find-max;
3. the headroom size: the same exact search against headroom x limit, reusing measured peaks;
4. a probe (peak) per candidate micro-batch, then — every probe done, so that with isolated probes
   no child shares the device with this process's model — FLOPs and timed steps; then, when
   the pick misses the target global batch, micro-batches that divide it (probed and timed;
   not with isolated probes);
5. pure planning math (`planning.make_plan`): accumulation, LR, wall-clock, recommendation.
"""

from __future__ import annotations

import math

from batchprobe import launcher
from batchprobe.errors import ModelError, Problem, SpecError
from batchprobe.estimate import TraceError, estimate
from batchprobe.flows import noise as noise_flow
from batchprobe.flows import what_if
from batchprobe.flows.progress import Progress
from batchprobe.planning import (
    Measurement,
    Plan,
    PlanSettings,
    cost,
    make_plan,
    resolve_lr_rule,
)
from batchprobe.results import Failure, PlanRun, StepTiming, WhatIf
from batchprobe.search import Outcome
from batchprobe.session import Session, explain
from batchprobe.timing import flops_per_sample
from batchprobe.units import format_bytes

PLATEAU_WIDE = 0.15  # rows this close to the best are where an exact divisor is worth timing
NOISE_WARNING_RATIO = 4  # a global batch this many times B_noise needs 5x the minimal samples


def run(session: Session, progress: Progress | None = None) -> PlanRun:
    progress = progress or Progress()
    _check_inputs(session)
    wants_noise = session.spec.data is not None and not session.ranks.distributed
    noise = None
    if wants_noise and not session.isolated:
        progress.phase("noise-scale")
        noise = noise_flow.run(session)
    progress.phase("find-max")
    fm = session.search(progress=progress)
    run = PlanRun(find_max=fm, plan=None, noise=noise)
    if fm.max_batch_size is None or fm.interrupted or fm.error is not None:
        run.interrupted = fm.interrupted
        return run
    if session.poisoned:
        run.warnings.append(
            "a sticky device error poisoned this process: the max batch above was found in "
            "isolated probes, but timing needs a healthy process — run plan again"
        )
        return run
    try:
        _measure(session, run, progress)
        if wants_noise and run.noise is None:
            progress.phase("noise-scale")
            run.noise = noise_flow.run(session)
    except KeyboardInterrupt:
        run.interrupted = True
    run.plan = make_plan(_measurements(run), settings(session, run))
    run.warnings.extend(_warnings(session, run))
    if run.plan.recommended is not None and not run.interrupted:
        b = run.plan.recommended.micro_batch_size
        probe = run.peaks.get(b)
        run.explained = explain(session, b, [probe] if probe is not None else [])
    if session.spec.estimate.what_if and not run.interrupted:
        progress.phase("what-if")
        run.what_if = _what_if(session, progress)
    return run


def _what_if(session: Session, progress: Progress) -> list[WhatIf] | None:
    """estimate's what-if table against this device's limit (the budget, or its capacity
    with the allowance); None when the model cannot be traced."""
    what, capacity, allowance = session.backend.estimate_target(session.spec.estimate)
    try:
        base = estimate(session.spec, capacity, allowance, what)
    except TraceError as exc:
        progress.event(f"what-if skipped: the model cannot be traced ({exc.op or exc})")
        return None
    return what_if.run(session.spec, base, progress)


def _check_inputs(session: Session) -> None:
    """Fail before any probe when the plan cannot be made from this spec."""
    if session.workload.inputs.tokens_per_sample is None:
        for key in ("global_tokens", "total_tokens"):
            if getattr(session.spec.plan, key) is not None:
                raise SpecError(
                    [
                        Problem(
                            f"plan.{key}", "needs token inputs (inputs.kind: tokens with seq_len)"
                        )
                    ]
                )


def _measure(session: Session, run: PlanRun, progress: Progress) -> None:
    fm = run.find_max
    assert fm.max_batch_size is not None
    for p in fm.probes:
        if p.outcome is Outcome.FIT:
            run.peaks[p.batch_size] = p
    progress.phase("headroom")
    run.headroom_batch_size = _headroom_size(session, run, progress)
    sizes = candidates(session, fm.max_batch_size, run.headroom_batch_size)
    fitting = _fitting(session, run, sizes)
    if session.spec.plan.peak_tflops is not None or _peak_flops(session) is not None:
        progress.phase("flops")
        run.flops_fixed, run.flops_per_sample, run.flops_conv_share = flops_per_sample(session.step)
    progress.phase("timing")
    _time(session, run, fitting, progress)
    if session.spec.plan.candidates:
        return
    # -- the exact target: micro-batches that divide it, near the plateau just measured
    extra = exact_candidates(
        make_plan(_measurements(run), settings(session, run)),
        limit=run.headroom_batch_size or fm.max_batch_size,
        tried=set(run.timings) | set(sizes),
    )
    if extra and session.isolated:  # children would share the device with the timed model
        run.warnings.append(
            f"micro-batches {', '.join(map(str, extra))} reach the target exactly but were not "
            "timed: with isolated probes every probe comes before timing (list them in "
            "plan.candidates)"
        )
    elif extra:
        progress.phase("exact")
        _time(session, run, _fitting(session, run, extra), progress)


def _fitting(session: Session, run: PlanRun, sizes: list[int]) -> list[int]:
    """The sizes that fit, each with its probe (peak) in run.peaks."""
    fitting = []
    for b in sizes:
        if b not in run.peaks:
            probe = session.probe(b)
            if probe.outcome is not Outcome.FIT:
                run.warnings.append(
                    f"micro-batch {b} did not fit when measured again ({probe.outcome}); skipped"
                )
                continue
            run.peaks[b] = probe
        fitting.append(b)
    return fitting


_BUSY = "timed while other processes held the CPUs"  # the start of the plan's warning


def _time(session: Session, run: PlanRun, sizes: list[int], progress: Progress) -> None:
    measured: dict[int, StepTiming | Failure] = {}
    try:
        session.time(sizes, progress, into=measured)
    except KeyboardInterrupt:  # the rows measured so far are kept
        _keep_timings(run, measured, interrupted=True)
        raise
    now = session.device.limit_now()
    _keep_timings(run, measured, moving=now[0] if now is not None and now[1] else None)
    waits = [t.cpu_wait for t in run.timings.values() if t.busy and t.cpu_wait is not None]
    if waits and not any(w.startswith(_BUSY) for w in run.warnings):
        run.warnings.append(
            f"{_BUSY} (this process's threads waited for a CPU up to {max(waits):.0%} of the "
            "time): the step times are this busy machine's, not the code's; time again on a "
            "quiet one"
        )


def _keep_timings(
    run: PlanRun,
    measured: dict[int, StepTiming | Failure],
    interrupted: bool = False,
    moving: int | None = None,
) -> None:
    """The timings into the plan; a size that failed while timed is said and skipped. `moving`:
    the limit left once timed, where it moves with what the process itself maps (an rlimit)."""
    for b, timing in sorted(measured.items()):
        if not isinstance(timing, Failure):
            run.timings[b] = timing
        elif timing.outcome is Outcome.ERROR and not interrupted:
            raise ModelError(f"timing micro-batch {b} failed: {timing.message}")
        else:
            why = ""
            peak = run.peaks[b].peak_bytes if b in run.peaks else None
            if moving is not None and peak is not None and moving < peak:
                limit = str(run.find_max.device.details.get("capacity", "the rlimit"))
                why = (
                    f": under {limit.split(' less ')[0]} each batch size run leaves its library "
                    f"kernels mapped, and this process had {format_bytes(moving)} left for "
                    f"tensors by then, under its {format_bytes(peak)} peak (a training run at "
                    "one batch size has that room)"
                )
            run.warnings.append(
                f"micro-batch {b} fit when probed but hit {timing.outcome} while timed "
                f"({timing.message}); skipped{why}"
            )


def _headroom_size(session: Session, run: PlanRun, progress: Progress) -> int | None:
    """Largest tested size whose peak stays within plan.headroom of the limit: the same search,
    against headroom x limit, starting from what is known."""
    limit = session.limit_bytes
    fm = run.find_max
    assert fm.max_batch_size is not None
    if not limit:
        return None
    cap = int(session.spec.plan.headroom * limit)
    inside = [b for b, p in run.peaks.items() if p.peak_bytes is not None and p.peak_bytes <= cap]
    start = max(inside) if inside else session.spec.probe.start
    if start == fm.max_batch_size:
        return start
    inner = session.search(
        limit_bytes=cap,
        start=start,
        cap=fm.max_batch_size,
        known=dict(run.peaks),
        progress=progress,
    )
    for p in inner.probes:
        if p.outcome is Outcome.FIT and not p.reused:
            run.peaks.setdefault(p.batch_size, p)
    if inner.interrupted:
        raise KeyboardInterrupt
    return inner.max_batch_size


def candidates(session: Session, max_batch: int, headroom_batch: int | None) -> list[int]:
    """plan.candidates if given (capped at max), else powers of two up to the max, the max,
    and the headroom size."""
    if session.spec.plan.candidates:
        return sorted({b for b in session.spec.plan.candidates if b <= max_batch})
    sizes = {2**k for k in range(int(math.log2(max_batch)) + 1)}
    sizes.add(max_batch)
    if headroom_batch:
        sizes.add(headroom_batch)
    return sorted(sizes)


EXACT_NEAR = 2.0  # divisors within this factor of the plateau's micro-batches are tried
EXACT_MAX = 3  # at most this many extra micro-batches


def exact_candidates(plan: Plan, limit: int, tried: set[int]) -> list[int]:
    """Micro-batches that reach the target global batch exactly (they divide the target per
    device), when the preliminary pick does not: the largest one up to `limit` (the headroom
    size), so that the exact target is on the table whenever memory allows it, and up to
    EXACT_MAX more within EXACT_NEAR of the micro-batches on the plateau (eligible rows within
    PLATEAU_WIDE of the best), nearest to the pick first; none already tried."""
    s = plan.settings
    choice = plan.recommended
    if choice is None or choice.divides_exactly or s.target_global_batch % s.world_size:
        return []
    per_device = s.target_global_batch // s.world_size
    divisors = [d for d in range(1, min(per_device, limit) + 1) if per_device % d == 0]
    best = min(cost(r) for r in plan.rows if r.eligible)
    plateau = [
        r.micro_batch_size for r in plan.rows if r.eligible and cost(r) <= best * (1 + PLATEAU_WIDE)
    ]
    low, high = min(plateau) / EXACT_NEAR, max(plateau) * EXACT_NEAR
    near = [d for d in divisors if low <= d <= high and d not in tried]
    near.sort(key=lambda d: abs(math.log(d / choice.micro_batch_size)))
    picked = set(near[:EXACT_MAX])
    if divisors[-1] not in tried:
        picked.add(divisors[-1])
    return sorted(picked)


def _peak_flops(session: Session, conv_share: float = 0.0) -> float | None:
    """The peak of the math that runs: in float32, convolutions and matmuls may run at different
    peaks (TF32 or not), so the peak is the one that takes the counted FLOPs' time."""
    if session.spec.plan.peak_tflops is not None:
        return session.spec.plan.peak_tflops * 1e12
    precision = session.spec.train.precision
    matmul = session.backend.peak_flops(precision, "matmul")
    conv = session.backend.peak_flops(precision, "conv")
    if matmul is None or conv is None:
        return None
    return 1.0 / (conv_share / conv + (1.0 - conv_share) / matmul)


def _measurements(run: PlanRun) -> list[Measurement]:
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
                cpu_wait=t.cpu_wait,
            )
        )
    return out


def world_size(session: Session) -> int:
    if session.spec.plan.num_gpus is not None:
        return session.spec.plan.num_gpus
    return launcher.world_size()


def settings(session: Session, run: PlanRun) -> PlanSettings:
    spec, plan = session.spec, session.spec.plan
    tokens = session.workload.inputs.tokens_per_sample
    world = world_size(session)
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
        limit_bytes=session.limit_bytes,
        capacity_bytes=session.backend.capacity_bytes,
        headroom=plan.headroom,
        base_lr=plan.base_lr,
        base_batch_size=plan.base_batch_size,
        lr_rule=resolve_lr_rule(plan.lr_scaling, spec.train.optimizer.name),
        optimizer=spec.train.optimizer.name,
        total_samples=total,
        epoch_samples=plan.dataset_size,
        peak_flops=_peak_flops(session, run.flops_conv_share),
        has_batchnorm=session.workload.has_batchnorm,
        target_note=note,
    )


def _warnings(session: Session, run: PlanRun) -> list[str]:
    out = []
    plan = run.plan
    if run.noise is not None and plan is not None and plan.recommended is not None:
        b = run.noise.b_simple
        target = plan.recommended.global_batch_size
        if 0 < b < target / NOISE_WARNING_RATIO:
            out.append(
                f"the global batch {target} is {target / b:.0f}x the measured gradient noise "
                f"scale (~{b:,.0f}): far past the critical batch size, doubling it barely "
                "cuts the optimizer steps and multiplies the samples needed "
                f"({1 + target / b:.1f}x the fewest; McCandlish et al. 2018)"
            )
    world = world_size(session)
    if world > 1 and launcher.world_size() != world:
        out.append(
            f"projected for {world} ranks from one device's timings: the gradient all-reduce "
            "is not in the figures (run under torchrun to measure it)"
        )
    return out
