"""estimate: full training steps traced with fake tensors, and the largest batch for a target.

The target is a GPU from the table (`estimate.gpu`), a capacity (`estimate.capacity`, a GPU), or
the configured device. When the model cannot be traced, says which op and falls back to real
probes on the configured device — unless the target is not here, where probes would answer for
the wrong machine.
"""

from __future__ import annotations

import dataclasses

from batchprobe.backends import backend_class, get_backend
from batchprobe.errors import DeviceError
from batchprobe.estimate import TraceError, Tracer, estimate
from batchprobe.flows import what_if
from batchprobe.flows.progress import Progress
from batchprobe.gpus import lookup
from batchprobe.results import Allowance, EstimateRun
from batchprobe.session import (
    Session,
    apply_budget,
    check_trace,
    open_session,
    settled_after_first_trace,
)
from batchprobe.spec import Spec
from batchprobe.units import format_bytes


def target(spec: Spec) -> tuple[str, int, Allowance]:
    """(what, capacity, allowance): a GPU from the table, a given capacity (a GPU), or the
    configured device, which says what it adds to a trace."""
    e = spec.estimate
    if e.gpu is not None:
        gpu = lookup(e.gpu)
        assert gpu is not None  # checked when the spec was loaded
        allowance = backend_class("cuda").allowance(e, gpu.major)
        return gpu.name, e.capacity or gpu.capacity_bytes, allowance
    if e.capacity is not None:
        what = f"a GPU with {format_bytes(e.capacity)}"
        return what, int(e.capacity), backend_class("cuda").allowance(e)
    backend = get_backend(spec.probe.device)
    apply_budget(spec, backend)
    return backend.estimate_target(e)


def run(spec: Spec, progress: Progress | None = None, timeline: bool = False) -> EstimateRun:
    """The estimate; with `timeline`, the traced steps at the max op by op (for --plot)."""
    progress = progress or Progress()
    here = spec.estimate.gpu is None and spec.estimate.capacity is None
    what, capacity, allowance = target(spec)
    result = EstimateRun(what, capacity, allowance)
    session: Session | None = None
    tracer = None
    try:
        tracer = Tracer(spec, allowance, steps=spec.probe.steps)
        if here and spec.estimate.verify:
            # the probe that verifies needs the device: where the trace says batch 1 may fit,
            # open it now (building and warming the model, and the trace's own code, take room
            # an rlimit counts) and estimate against what is left then
            first = tracer.trace(1)
            if first.device_bytes <= allowance.usable(capacity):
                session = open_session(spec)
                settled_after_first_trace(session)
                what, capacity, _ = session.backend.estimate_target(spec.estimate)
                result = EstimateRun(what, capacity, allowance, device=session.backend.info())
        result.result = estimate(
            spec,
            capacity,
            allowance,
            what,
            batch_sizes=spec.estimate.batch_sizes or (),
            on_point=progress.traced,
            tracer=tracer,
        )
    except TraceError as exc:
        if not here:
            raise DeviceError(
                f"the model cannot be traced with fake tensors ({exc.op or exc}), and {what} "
                "is not here to probe: run `batchprobe find-max` on it"
            ) from None
        result.trace_error = exc.failure
        result.fallback = (session or open_session(spec)).search(progress=progress)
        return result
    if spec.estimate.what_if:
        result.what_if = what_if.run(spec, result.result, progress)
    if spec.estimate.sweep_seq_len:
        result.sweep = what_if.sweep(spec, result.result, spec.estimate.sweep_seq_len, progress)
    if timeline and result.result.max_batch_size is not None and tracer is not None:
        result.timeline = tracer.timeline(result.result.max_batch_size)
    best = result.result.max_batch_size
    if session is not None and best is not None:
        verify(session, result, best, progress)
    return result


def verify(session: Session, run: EstimateRun, best: int, progress: Progress) -> None:
    """One real probe at the estimated max on the device the estimate is for, and the trace
    against it: what was traced there, what the probe measured."""
    assert run.result is not None
    point = next(p for p in run.result.points if p.batch_size == best)
    progress.probe_started(best)
    probe = session.probe(best)
    progress.probe_done(probe)
    run.verify_probe = probe
    run.device = session.backend.info()
    check = check_trace(point.device_bytes, probe, lambda: point.op_bytes)
    run.verified = None if check is None else dataclasses.replace(check, corrected=False)
