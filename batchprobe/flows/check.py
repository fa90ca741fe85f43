"""`batchprobe check`: expectations from the spec and a baseline, measured with as little as they
need — a max batch of at least N holds exactly when N fits, so it is one probe."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from batchprobe.flows.progress import Progress
from batchprobe.results import (
    CheckOutcome,
    CheckRun,
    Expectation,
    Failure,
    ProbeResult,
    StepTiming,
)
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
    `update_baseline`, also a full find-max and the figures a later run compares against.

    Every probe comes first, then the timings: with isolated probes, this process takes the
    model onto the device only once no child needs it."""
    started = time.perf_counter()
    spec = session.spec
    m = _Measure(session, (progress or Progress()).event)
    wanted = expectations(spec, baseline)
    run = CheckRun([], session.backend.info(), 0.0)
    try:
        memory = {i: _evaluate_memory(e, spec.check.tolerance, m) for i, e in enumerate(wanted)}
        fm = None
        if update_baseline:
            m.say("find-max for the baseline")
            fm = session.search()
        sizes = _baseline_sizes(spec, fm.max_batch_size if fm else None)
        for e in wanted:  # the sizes to time must fit first
            if e.micro_batch_size is not None:
                m.probe(e.micro_batch_size)
        for b in sizes:
            m.probe(b)
        for i, e in enumerate(wanted):
            run.outcomes.append(memory[i] or _evaluate_speed(e, spec.check.tolerance, m))
        if fm is not None:
            run.baseline = _baseline(session, fm.max_batch_size, sizes, m)
    except KeyboardInterrupt:
        run.interrupted = True
    run.seconds = time.perf_counter() - started
    return run


class _Measure:
    """The check's probes and timings, each made once."""

    def __init__(self, session: Session, say: Callable[[str], None]) -> None:
        self.session = session
        self.say = say
        self.tokens = session.workload.inputs.tokens_per_sample
        self.probes: dict[int, ProbeResult] = {}
        self.timings: dict[int, StepTiming | Failure] = {}

    def probe(self, b: int) -> ProbeResult:
        if b not in self.probes:
            self.say(f"probe at micro-batch {b}")
            self.probes[b] = self.session.probe(b)
        return self.probes[b]

    def timing(self, b: int, again: bool = False) -> StepTiming | Failure | None:
        """None when `b` does not fit; a Failure when a step failed while timed. `again`
        measures anew."""
        if self.probe(b).outcome is not Outcome.FIT:
            return None
        if b not in self.timings or again:
            self.say(f"timing micro-batch {b}" + (" again" if again else ""))
            self.timings[b] = self.session.time([b])[b]
        return self.timings[b]


def _evaluate_memory(e: Expectation, tol: float, m: _Measure) -> CheckOutcome | None:
    """Max batch and peak expectations (probes); None for the others."""
    if e.name == "max_batch_size":
        need = max(1, math.ceil(e.value * (1 - tol)))
        result = m.probe(need)
        if result.outcome is Outcome.FIT:
            return CheckOutcome(e, tol, need, True, f"{need} fits: the max is at least {need}")
        # failed: find the actual max (below `need`) so the report says how far it fell
        below = None
        if need > 1:
            start = min(m.session.spec.probe.start, need - 1)
            below = m.session.search(cap=need - 1, start=start).max_batch_size
        why = result.failure.kind if result.failure else result.outcome.value
        return CheckOutcome(
            e, tol, below, False, f"{need} does not fit ({why}); measured: the max below"
        )
    if e.name != "peak_bytes":
        return None
    assert e.micro_batch_size is not None
    b = e.micro_batch_size
    result = m.probe(b)
    if result.outcome is not Outcome.FIT:
        return CheckOutcome(e, tol, None, False, f"micro-batch {b} does not fit ({result.outcome})")
    peak = result.peak_bytes or 0
    limit = e.value * (1 + tol)
    return CheckOutcome(
        e, tol, peak, peak <= limit, f"peak {format_bytes(peak)} at micro-batch {b}"
    )


NOISE_CAP = 0.5  # the most a measured spread widens a throughput check's margin
#: on a busy machine (`StepTiming.busy`) a drop is not judged unless the step is this many times
#: slower than expected: torch's threads falling into lock-step behind other processes were seen
#: to make a step 180x slower, steady to 1%
BUSY_SLOWDOWN = 1000.0


def speed_verdict(
    expected: float, tol: float, rate: float, noise: float, busy: bool = False
) -> tuple[bool, str]:
    """A throughput expectation against a measurement with relative `noise` (the timing's
    spread): it fails only when the drop exceeds the tolerance plus the noise — a busy
    machine widens the margin, it does not fail the check — and says how sure it is. The noise
    counts up to NOISE_CAP: a throughput below half the expectation (and the tolerance) fails
    however noisy the timing. When the step was timed while other processes held the CPUs
    (`busy`), its wall-clock time says little about the code: a drop is not judged (unless the
    step is BUSY_SLOWDOWN times slower than expected) and the verdict says "unsure"."""
    noise = min(noise, NOISE_CAP)
    drop = 1 - rate / expected
    if drop <= tol:
        return True, "within tolerance"
    if drop <= tol + noise:
        return True, f"{drop:.0%} below, within tolerance + measured noise ({noise:.0%}): unsure"
    if busy and rate * BUSY_SLOWDOWN >= expected:
        return True, f"{drop:.0%} below on a busy machine: not judged, unsure"
    return False, f"{drop:.0%} below: more than tolerance + measured noise ({tol + noise:.0%})"


def _evaluate_speed(e: Expectation, tol: float, m: _Measure) -> CheckOutcome:
    assert e.micro_batch_size is not None
    b = e.micro_batch_size
    if e.name == "tokens_per_s" and m.tokens is None:
        return CheckOutcome(e, tol, None, False, "tokens/s needs token inputs")
    t = m.timing(b)
    if t is None:
        return CheckOutcome(e, tol, None, False, f"micro-batch {b} does not fit")
    if isinstance(t, Failure):
        return CheckOutcome(
            e, tol, None, False, f"micro-batch {b} failed while timed ({t.kind}: {t.message})"
        )
    scale = b * (m.tokens if e.name == "tokens_per_s" and m.tokens else 1)
    passed, why = speed_verdict(e.value, tol, scale / t.step_s, t.spread, t.busy)
    if not speed_verdict(e.value, tol, scale / t.step_s, t.spread)[0]:
        # failed, or not judged on a busy machine: measure again (load only slows a step,
        # keep the faster)
        again = m.timing(b, again=True)
        if isinstance(again, StepTiming):
            t = min(t, again, key=lambda x: x.step_s)
            passed, why = speed_verdict(e.value, tol, scale / t.step_s, t.spread, t.busy)
            why += " (measured twice)"
    busy = (
        f", threads waited for a CPU {t.cpu_wait:.0%} of the time (busy machine)"
        if t.busy and t.cpu_wait is not None
        else ""
    )
    return CheckOutcome(
        e,
        tol,
        scale / t.step_s,
        passed,
        f"step {t.step_s * 1e3:.3g} ms at micro-batch {b}, spread {t.spread:.0%}{busy}; {why}",
        noise=t.spread,
        cpu_wait=t.cpu_wait,
    )


def _baseline_sizes(spec: Spec, max_batch: int | None) -> list[int]:
    """The micro-batches a baseline records: those the spec names, else the largest power of
    two up to the max."""
    if max_batch is None:
        return []
    c = spec.check
    sizes = {
        t.micro_batch_size for t in (c.min_samples_per_s, c.min_tokens_per_s, c.max_peak_bytes) if t
    }
    return sorted(sizes or {2 ** int(math.log2(max_batch))})


def _baseline(
    session: Session, max_batch: int | None, sizes: list[int], m: _Measure
) -> dict[str, Any]:
    measurements = []
    for b in sizes:
        t = m.timing(b)
        result = m.probe(b)
        step_s = t.step_s if isinstance(t, StepTiming) else None
        measurements.append(
            {
                "micro_batch_size": b,
                "peak_bytes": result.peak_bytes if result.outcome is Outcome.FIT else None,
                "samples_per_s": b / step_s if step_s else None,
                "tokens_per_s": b / step_s * m.tokens if step_s and m.tokens else None,
                "timing_spread": t.spread if isinstance(t, StepTiming) else None,
                "cpu_wait": t.cpu_wait if isinstance(t, StepTiming) else None,
            }
        )
    info = session.backend.info()
    return {
        "command": "check-baseline",
        "model": session.spec.model.source,
        "device": info.device,
        "device_name": info.name,
        "torch_version": info.torch_version,
        "budget_bytes": session.backend.budget_bytes,
        "max_batch_size": max_batch,
        "measurements": measurements,
    }
