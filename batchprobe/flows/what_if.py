"""What would move the max: the spec's model traced under each change that applies — another
precision, gradient checkpointing, a stateless optimizer or none, the optimizer's foreach path
off, channels-last, half the sequence — each an estimate (seconds, no device memory), as the
`--set` that makes it; and the max micro-batch against the sequence length (`sweep`).

Which changes leave the results alone: checkpointing, foreach and channels-last compute the
same thing; precision and the optimizer change the numerics; a shorter sequence changes the
data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

from batchprobe.errors import ModelError, Problem, SpecError
from batchprobe.estimate import TraceError, estimate
from batchprobe.flows.progress import Progress
from batchprobe.results import Allowance, Effect, EstimateResult, SweepPoint, WhatIf
from batchprobe.sources import Inputs, build_workload, quiet_warnings
from batchprobe.spec import Spec, load_spec

AS_SPECIFIED = "(as specified)"
STATEFUL = ("adam", "adamw")


def changes(spec: Spec, allowance: Allowance) -> Iterator[tuple[str, Effect]]:
    """(the --set, its effect) for every change that applies to this spec."""
    train = spec.train
    for precision in ("bf16", "fp16", "fp32"):
        if precision != train.precision:
            yield f"train.precision={precision}", "numerics"
    if not train.gradient_checkpointing:
        yield "train.gradient_checkpointing=true", "none"
    opt = train.optimizer
    if opt.name in STATEFUL or (opt.name == "sgd" and opt.kwargs.get("momentum")):
        yield f"train.optimizer={{name: sgd, lr: {opt.lr}}}", "numerics"
    if opt.name != "none":
        yield "train.optimizer=none", "numerics"
    chosen = "foreach" in opt.kwargs or "fused" in opt.kwargs
    if allowance.foreach and opt.name != "none" and not chosen:
        yield "train.optimizer.foreach=false", "none"
    inputs = _inputs(spec)
    if inputs.kind == "image" and not train.channels_last:
        yield "train.channels_last=true", "none"
    if inputs.kind == "tokens" and inputs.seq_len and inputs.seq_len >= 2:
        yield f"inputs.seq_len={inputs.seq_len // 2}", "data"


def run(
    spec: Spec,
    base: EstimateResult,
    progress: Progress | None = None,
) -> list[WhatIf]:
    """The spec's own estimate and one per change, largest max first; a change that could not
    be estimated (a model without a checkpointing switch, an untraceable variant) says why,
    last."""
    progress = progress or Progress()
    rows = [_row(AS_SPECIFIED, "spec", base)]
    for change, effect in changes(spec, base.allowance):
        progress.event(f"what if {change}")
        try:
            variant = with_change(spec, change)
            result = estimate(variant, base.capacity_bytes, base.allowance, base.target)
        except (SpecError, ModelError, TraceError) as exc:
            rows.append(WhatIf(change, None, None, effect, _why(exc)))
            continue
        rows.append(_row(change, effect, result))
    return sorted(rows, key=lambda r: (-(r.max_batch_size or 0), r.error is not None))


def sweep(
    spec: Spec, base: EstimateResult, lengths: tuple[int, ...], progress: Progress | None = None
) -> list[SweepPoint]:
    """The estimated max micro-batch at each sequence length (token inputs), in order; a
    length beyond the model's maximum positions is not traced, and says so."""
    progress = progress or Progress()
    inputs = _inputs(spec)
    if inputs.kind != "tokens":
        raise SpecError(
            [Problem("estimate.sweep_seq_len", f"needs token inputs, not {inputs.kind}")]
        )
    points = []
    for n in lengths:
        if inputs.max_seq_len is not None and n > inputs.max_seq_len:
            why = f"longer than the model's {inputs.max_seq_len} positions"
            points.append(SweepPoint(n, None, None, why))
            continue
        progress.event(f"sweep: seq_len {n}")
        try:
            variant = with_change(spec, f"inputs.seq_len={n}")
            result = estimate(variant, base.capacity_bytes, base.allowance, base.target)
        except (SpecError, ModelError, TraceError) as exc:
            points.append(SweepPoint(n, None, None, _why(exc)))
            continue
        point = result.point(result.max_batch_size)
        peak = point.device_bytes if point is not None else None
        points.append(SweepPoint(n, result.max_batch_size, peak))
    return points


def with_change(spec: Spec, change: str) -> Spec:
    """The spec with one `--set` applied, as the user would run it."""
    return replace(
        load_spec(text=json.dumps(spec.to_dict()), overrides=[change]), origin=spec.origin
    )


def _inputs(spec: Spec) -> Inputs:
    """The spec's inputs with the model's defaults filled in (the model built on no device)."""
    with quiet_warnings():
        return build_workload(spec, "meta").inputs


def _row(change: str, effect: Effect, result: EstimateResult) -> WhatIf:
    best = result.max_batch_size
    point = result.point(best)
    return WhatIf(change, best, point.device_bytes if point else None, effect)


def _why(exc: Exception) -> str:
    if isinstance(exc, SpecError):
        return "; ".join(f"{p.path}: {p.message}" for p in exc.problems)
    return str(exc).splitlines()[0][:200]
