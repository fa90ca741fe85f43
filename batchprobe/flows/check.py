"""`batchprobe check`: expectations from the spec and a baseline, measured with as little as they
need — a max batch of at least N holds exactly when N fits, so it is one probe."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from batchprobe.flows.progress import Progress
from batchprobe.results import CheckOutcome, CheckRun, Expectation, ProbeResult, StepTiming
from batchprobe.search import Outcome
from batchprobe.session import Session
from batchprobe.spec import Spec
from batchprobe.units import format_bytes


def expectations(spec: Spec, baseline: dict[str, Any] | None) -> list[Expectation]:
    """From the spec's check section and from a baseline written by --update-baseline."""
    c = spec.check
    out: list[Expectation] = []
    if c.min_max_batch_size is not None:
        out.append(Expectation("max_batch_size", "spec", c.min_max_batch_size))
    if c.min_samples_per_s is not None:
        t = c.min_samples_per_s
        out.append(Expectation("samples_per_s", "spec", t.value, t.micro_batch_size))
    if c.min_tokens_per_s is not None:
        t = c.min_tokens_per_s
        out.append(Expectation("tokens_per_s", "spec", t.value, t.micro_batch_size))
    if c.max_peak_bytes is not None:
        out.append(
            Expectation(
                "peak_bytes", "spec", c.max_peak_bytes.value, c.max_peak_bytes.micro_batch_size
            )
        )
    if baseline is not None:
        if baseline.get("max_batch_size"):
            out.append(Expectation("max_batch_size", "baseline", baseline["max_batch_size"]))
        for m in baseline.get("measurements", []):
            for name in ("samples_per_s", "tokens_per_s", "peak_bytes"):
                if m.get(name) is not None:
                    out.append(Expectation(name, "baseline", m[name], m["micro_batch_size"]))
    return out


def run(
    session: Session,
    baseline: dict[str, Any] | None,
    update_baseline: bool = False,
    progress: Progress | None = None,
) -> CheckRun:
    """Measure only what the expectations need: a single probe per size asked about (a max
    batch of at least N holds iff N fits), a timing per throughput expectation. With
    `update_baseline`, also a full find-max and the figures a later run compares against."""
    started = time.perf_counter()
    spec = session.spec
    tol = spec.check.tolerance
    tokens = session.workload.inputs.tokens_per_sample
    say = (progress or Progress()).event
    probes: dict[int, ProbeResult] = {}
    timings: dict[int, StepTiming] = {}
    outcomes: list[CheckOutcome] = []
    run = CheckRun(outcomes, session.backend.info(), 0.0)

    def probe(b: int) -> ProbeResult:
        if b not in probes:
            say(f"probe at micro-batch {b}")
            probes[b] = session.probe(b)
        return probes[b]

    def timing(b: int) -> StepTiming | None:
        if b not in timings:
            if probe(b).outcome is not Outcome.FIT:
                return None
            say(f"timing micro-batch {b}")
            timings[b] = session.time(b)
        return timings[b]

    try:
        for e in expectations(spec, baseline):
            outcomes.append(_evaluate(e, tol, probe, timing, tokens, session))
        if update_baseline:
            run.baseline = _measure_baseline(session, spec, probe, timing, tokens, say)
    except KeyboardInterrupt:
        run.interrupted = True
    run.seconds = time.perf_counter() - started
    return run


def _evaluate(
    e: Expectation,
    tol: float,
    probe: Callable[[int], ProbeResult],
    timing: Callable[[int], StepTiming | None],
    tokens: int | None,
    session: Session,
) -> CheckOutcome:
    if e.name == "max_batch_size":
        need = max(1, math.ceil(e.value * (1 - tol)))
        result = probe(need)
        if result.outcome is Outcome.FIT:
            return CheckOutcome(e, tol, need, True, f"{need} fits: the max is at least {need}")
        # failed: find the actual max (below `need`) so the report says how far it fell
        below = None
        if need > 1:
            start = min(session.spec.probe.start, need - 1)
            below = session.search(cap=need - 1, start=start).max_batch_size
        why = result.failure.kind if result.failure else result.outcome.value
        return CheckOutcome(
            e,
            tol,
            below,
            False,
            f"{need} does not fit ({why}); measured: the max below",
        )
    assert e.micro_batch_size is not None
    b = e.micro_batch_size
    if e.name == "peak_bytes":
        result = probe(b)
        if result.outcome is not Outcome.FIT:
            return CheckOutcome(
                e, tol, None, False, f"micro-batch {b} does not fit ({result.outcome})"
            )
        peak = result.peak_bytes or 0
        limit = e.value * (1 + tol)
        return CheckOutcome(
            e, tol, peak, peak <= limit, f"peak {format_bytes(peak)} at micro-batch {b}"
        )
    if e.name == "tokens_per_s" and tokens is None:
        return CheckOutcome(e, tol, None, False, "tokens/s needs token inputs")
    t = timing(b)
    if t is None:
        return CheckOutcome(e, tol, None, False, f"micro-batch {b} does not fit")
    rate = b / t.step_s * (tokens if e.name == "tokens_per_s" and tokens else 1)
    note = " (unstable timing)" if t.unstable else ""
    return CheckOutcome(
        e,
        tol,
        rate,
        rate >= e.value * (1 - tol),
        f"step {t.step_s * 1e3:.3g} ms at micro-batch {b}{note}",
    )


def _measure_baseline(
    session: Session,
    spec: Spec,
    probe: Callable[[int], ProbeResult],
    timing: Callable[[int], StepTiming | None],
    tokens: int | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    say("find-max for the baseline")
    fm = session.search()
    c = spec.check
    sizes = {
        t.micro_batch_size for t in (c.min_samples_per_s, c.min_tokens_per_s, c.max_peak_bytes) if t
    }
    if not sizes and fm.max_batch_size:
        sizes = {2 ** int(math.log2(fm.max_batch_size))}
    measurements = []
    for b in sorted(sizes):
        t = timing(b)
        result = probe(b)
        measurements.append(
            {
                "micro_batch_size": b,
                "peak_bytes": result.peak_bytes if result.outcome is Outcome.FIT else None,
                "samples_per_s": b / t.step_s if t else None,
                "tokens_per_s": b / t.step_s * tokens if t and tokens else None,
            }
        )
    info = session.backend.info()
    return {
        "command": "check-baseline",
        "model": spec.model.source,
        "device": info.device,
        "device_name": info.name,
        "torch_version": info.torch_version,
        "budget_bytes": session.backend.budget_bytes,
        "max_batch_size": fm.max_batch_size,
        "measurements": measurements,
    }
