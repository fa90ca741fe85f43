"""Pure planning math: accumulation, learning-rate scaling, warm-up, wall-clock, recommendation.

No torch, no device: measurements in, a Plan out. Formulas and sources:
- accumulation: global = micro x accum x world; accum = ceil(global / (micro x world)).
- linear LR scaling (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): lr = base x B / B_base.
- square-root scaling for Adam-family optimizers (Malladi et al. 2022, "On the SDEs and Scaling
  Rules for Adaptive Gradient Algorithms"): lr = base x sqrt(B / B_base).
- wall-clock: steps = ceil(samples / global); t_update = accum x t_fwd_bwd + t_optimizer.
- MFU: model FLOPs per update / (t_update x peak FLOP/s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

LrRule = Literal["linear", "sqrt", "none"]
WarmupLevel = Literal["none", "suggested", "required", "critical"]

PLATEAU = 0.03  # within 3% of the best projected time counts as the same
MAX_ACCUM = 64  # more accumulation steps than this are not recommended when fewer fit
SMALL_BN_BATCH = 16  # BatchNorm statistics over fewer samples than this are noisy
NEAR_TARGET = 0.10  # a realised global batch this far above the target still counts as it
UNSTABLE_SPREAD = 0.10  # relative interquartile range above which a timing is flagged


@dataclass(frozen=True)
class Measurement:
    """What was measured for one candidate micro-batch on one device."""

    micro_batch_size: int
    peak_bytes: int | None
    fwd_bwd_s: float
    optimizer_s: float
    spread: float = 0.0
    flops: float | None = None  # model FLOPs of one forward+backward at this micro-batch
    fwd_bwd_nosync_s: float | None = None  # without the gradient all-reduce (distributed)
    #: share of the timed steps' CPU wants spent waiting for a CPU (busy machine); None: unknown
    cpu_wait: float | None = None


@dataclass(frozen=True)
class PlanSettings:
    target_global_batch: int  # samples per optimizer step
    world_size: int = 1
    tokens_per_sample: int | None = None
    limit_bytes: int | None = None  # capacity or budget the headroom applies to
    capacity_bytes: int | None = None
    headroom: float = 0.9
    base_lr: float | None = None
    base_batch_size: int | None = None
    lr_rule: LrRule = "none"  # already resolved from auto
    optimizer: str = "adamw"  # for the ready-to-paste snippets
    total_samples: float | None = None  # dataset_size x epochs, or total_tokens / seq_len
    epoch_samples: int | None = None  # dataset_size
    peak_flops: float | None = None  # per device
    has_batchnorm: bool = False
    target_note: str | None = None  # how the target was derived, when not given as samples


@dataclass(frozen=True)
class Row:
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    peak_bytes: int | None
    peak_fraction: float | None  # of the limit the headroom applies to
    fwd_bwd_time_s: float
    optimizer_time_s: float
    fwd_bwd_nosync_time_s: float | None  # without the all-reduce (distributed accumulation)
    step_time_s: float  # one micro-batch step with its optimizer step
    update_time_s: float  # accum x fwd_bwd + optimizer
    samples_per_s: float
    tokens_per_s: float | None
    mfu: float | None
    lr: float | None
    lr_ratio: float | None
    warmup: WarmupLevel
    warmup_steps: int | None
    optimizer_steps: int | None
    projected_seconds: float | None
    within_headroom: bool
    divides_exactly: bool
    spread: float
    target_global_batch: int
    #: why the recommendation may not pick this row (None: it may); set by `apply_rules`
    excluded_because: str | None = None
    cpu_wait: float | None = None  # see Measurement.cpu_wait

    @property
    def eligible(self) -> bool:
        return self.excluded_because is None

    @property
    def timing_stable(self) -> bool:
        return self.spread <= UNSTABLE_SPREAD

    def to_dict(self) -> dict[str, object]:
        return {
            "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "global_batch_size": self.global_batch_size,
            "peak_bytes": self.peak_bytes,
            "peak_fraction": _round(self.peak_fraction, 4),
            "fwd_bwd_time_s": self.fwd_bwd_time_s,
            "optimizer_time_s": self.optimizer_time_s,
            "fwd_bwd_nosync_time_s": self.fwd_bwd_nosync_time_s,
            "step_time_s": self.step_time_s,
            "update_time_s": self.update_time_s,
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": _round(self.mfu, 4),
            "lr": self.lr,
            "lr_ratio": self.lr_ratio,
            "warmup": self.warmup,
            "warmup_steps": self.warmup_steps,
            "optimizer_steps": self.optimizer_steps,
            "projected_seconds": self.projected_seconds,
            "within_headroom": self.within_headroom,
            "divides_exactly": self.divides_exactly,
            "timing_spread": _round(self.spread, 4),
            "timing_stable": self.timing_stable,
            "cpu_wait": _round(self.cpu_wait, 4),
            "eligible": self.eligible,
            "excluded_because": self.excluded_because,
        }


@dataclass(frozen=True)
class Plan:
    rows: tuple[Row, ...]
    recommended: Row | None
    settings: PlanSettings
    warnings: tuple[str, ...] = field(default_factory=tuple)
    reason: str = ""


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


# ----------------------------------------------------------------------------- formulas


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer step on each rank to reach at least `global_batch`."""
    if min(global_batch, micro_batch, world_size) < 1:
        raise ValueError("batch sizes and world size must be positive")
    return math.ceil(global_batch / (micro_batch * world_size))


def realised_global_batch(micro_batch: int, accum: int, world_size: int = 1) -> int:
    return micro_batch * accum * world_size


def resolve_lr_rule(rule: str, optimizer: str) -> LrRule:
    """auto -> sqrt for Adam-family optimizers, linear for SGD, none without an optimizer."""
    rules: dict[str, LrRule] = {"linear": "linear", "sqrt": "sqrt", "none": "none"}
    if rule in rules:
        return rules[rule]
    if optimizer in ("adam", "adamw"):
        return "sqrt"
    if optimizer == "sgd":
        return "linear"
    return "none"


def scaled_lr(base_lr: float, base_batch: int, global_batch: int, rule: str) -> float:
    ratio = global_batch / base_batch
    if rule == "linear":  # Goyal et al. 2017
        return base_lr * ratio
    if rule == "sqrt":  # Malladi et al. 2022
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown LR scaling rule {rule!r}")


def warmup_level(ratio: float | None) -> WarmupLevel:
    """How much the scaled LR needs a warm-up, by the batch ratio B / B_base.

    Rule of thumb from practice (after Goyal et al. 2017, who ramp over 5 epochs for large
    batches): at or below the base batch none, above it suggested, >= 8 required, >= 16
    critical. The number of steps (`warmup_steps`) grows continuously with the ratio.
    """
    if ratio is None or ratio <= 1:
        return "none"
    if ratio < 8:
        return "suggested"
    if ratio < 16:
        return "required"
    return "critical"


#: the share of all optimizer steps to ramp the LR over at a batch 16x the base (and above):
#: Goyal et al. ramp over 5 of 90 epochs (~5.6%) for 32x; we ramp a little longer, 10%
WARMUP_FRACTION = 0.1


def warmup_fraction(ratio: float | None) -> float:
    """The share of optimizer steps to warm up over, continuous in the batch ratio B / B_base:
    none at or below the base batch, rising with log2(ratio) to WARMUP_FRACTION at 16x — so a
    global batch of 532 gets about as many warm-up steps as one of 512, not a jump from 0."""
    if ratio is None or ratio <= 1:
        return 0.0
    return WARMUP_FRACTION * min(1.0, math.log2(ratio) / 4)


def warmup_steps(ratio: float | None, optimizer_steps: int | None) -> int | None:
    if optimizer_steps is None:
        return None
    fraction = warmup_fraction(ratio)
    return math.ceil(fraction * optimizer_steps) if fraction > 0 else 0


def optimizer_steps(total_samples: float, global_batch: int) -> int:
    return math.ceil(total_samples / global_batch)


def update_time_s(
    accum: int, fwd_bwd_s: float, optimizer_s: float, fwd_bwd_nosync_s: float | None = None
) -> float:
    """One optimizer update: accum forward+backward passes, then one optimizer step. Under
    data parallelism the first accum - 1 passes skip the gradient all-reduce (no_sync)."""
    if fwd_bwd_nosync_s is None:
        return accum * fwd_bwd_s + optimizer_s
    return (accum - 1) * fwd_bwd_nosync_s + fwd_bwd_s + optimizer_s


# ----------------------------------------------------------------------------- the plan


def make_row(m: Measurement, s: PlanSettings) -> Row:
    accum = grad_accum_steps(s.target_global_batch, m.micro_batch_size, s.world_size)
    global_batch = realised_global_batch(m.micro_batch_size, accum, s.world_size)
    t_update = update_time_s(accum, m.fwd_bwd_s, m.optimizer_s, m.fwd_bwd_nosync_s)
    samples_per_s = global_batch / t_update
    lr = ratio = None
    if s.base_lr is not None and s.base_batch_size is not None:
        ratio = global_batch / s.base_batch_size
        lr = scaled_lr(s.base_lr, s.base_batch_size, global_batch, s.lr_rule)
    # A larger LR needs warm-up; a rule of "none" leaves the LR alone and needs none.
    level: WarmupLevel = warmup_level(ratio) if s.lr_rule != "none" else "none"
    steps = optimizer_steps(s.total_samples, global_batch) if s.total_samples else None
    mfu = None
    if m.flops is not None and s.peak_flops:  # per device: its own FLOPs over its own peak
        mfu = accum * m.flops / (t_update * s.peak_flops)
    fraction = None
    if m.peak_bytes is not None and s.limit_bytes:
        fraction = m.peak_bytes / s.limit_bytes
    return Row(
        micro_batch_size=m.micro_batch_size,
        grad_accum_steps=accum,
        global_batch_size=global_batch,
        peak_bytes=m.peak_bytes,
        peak_fraction=fraction,
        fwd_bwd_time_s=m.fwd_bwd_s,
        optimizer_time_s=m.optimizer_s,
        fwd_bwd_nosync_time_s=m.fwd_bwd_nosync_s,
        step_time_s=m.fwd_bwd_s + m.optimizer_s,
        update_time_s=t_update,
        samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * s.tokens_per_sample if s.tokens_per_sample else None,
        mfu=mfu,
        lr=lr,
        lr_ratio=ratio,
        warmup=level,
        warmup_steps=warmup_steps(ratio if s.lr_rule != "none" else None, steps),
        optimizer_steps=steps,
        projected_seconds=steps * t_update if steps is not None else None,
        within_headroom=fraction is None or fraction <= s.headroom,
        divides_exactly=global_batch == s.target_global_batch,
        spread=m.spread,
        target_global_batch=s.target_global_batch,
        cpu_wait=m.cpu_wait,
    )


def cost(row: Row) -> float:
    """Seconds for the whole run when known, else seconds per sample: lower is better."""
    if row.projected_seconds is not None:
        return row.projected_seconds
    return row.update_time_s / row.global_batch_size


def apply_rules(rows: Sequence[Row], s: PlanSettings) -> tuple[Row, ...]:
    """Mark each row the recommendation may not pick, with the reason. The rules, in order:

    1. peak memory within the headroom;
    2. one micro-batch must not alone overshoot the target (global batch < 2x the target), and
       the realised global batch within NEAR_TARGET above the target when such a row exists
       (the LR and the optimization follow the global batch);
    3. with BatchNorm, a micro-batch of at least min(16, target per device) — its statistics
       are computed per micro-batch — when such a row passes 1-2;
    4. at most MAX_ACCUM accumulation steps, when such a row passes 1-3.

    Rules 3 and 4 give way when memory leaves nothing else (the warnings then say so). When no
    row passes 1-2, the smallest row within the headroom stays eligible."""
    reasons: dict[int, str] = {}
    inside = [r for r in rows if r.within_headroom]
    close = any(r.global_batch_size <= (1 + NEAR_TARGET) * r.target_global_batch for r in inside)
    for r in rows:
        over = r.global_batch_size / r.target_global_batch - 1
        if not r.within_headroom:
            reasons[r.micro_batch_size] = f"peak above the {s.headroom:.0%} headroom"
        elif r.global_batch_size >= 2 * r.target_global_batch:
            reasons[r.micro_batch_size] = (
                f"one micro-batch alone overshoots the target {r.target_global_batch}"
            )
        elif close and over > NEAR_TARGET:
            reasons[r.micro_batch_size] = (
                f"global batch {r.global_batch_size} is {over:.0%} above the target"
            )
    if inside and all(r.micro_batch_size in reasons for r in inside):
        del reasons[inside[0].micro_batch_size]

    def passing() -> list[Row]:
        return [r for r in rows if r.micro_batch_size not in reasons]

    per_device = math.ceil(s.target_global_batch / s.world_size)
    floor = min(SMALL_BN_BATCH, per_device)
    if s.has_batchnorm and any(r.micro_batch_size >= floor for r in passing()):
        for r in passing():
            if r.micro_batch_size < floor:
                reasons[r.micro_batch_size] = (
                    f"BatchNorm: micro-batch below {floor} gives noisy batch statistics"
                )
    if any(r.grad_accum_steps <= MAX_ACCUM for r in passing()):
        for r in passing():
            if r.grad_accum_steps > MAX_ACCUM:
                reasons[r.micro_batch_size] = (
                    f"{r.grad_accum_steps} accumulation steps, more than {MAX_ACCUM}"
                )
    return tuple(
        dataclasses.replace(r, excluded_because=reasons.get(r.micro_batch_size)) for r in rows
    )


def recommend(rows: Sequence[Row]) -> tuple[Row | None, str]:
    """Among the eligible rows (`apply_rules`): shortest projected wall-clock — the smallest
    micro-batch on the plateau (within PLATEAU of the best), preferring those whose global
    batch is exactly the target. The reason says what was excluded that would have been
    faster, and when the timings behind the pick were unstable."""
    usable = [r for r in rows if r.eligible]
    if not rows:
        return None, "no micro-batch was timed"
    if not usable:
        return None, "no candidate stays within the headroom"
    best = min(cost(r) for r in usable)
    plateau = [r for r in usable if cost(r) <= best * (1 + PLATEAU)]
    exact = [r for r in plateau if r.divides_exactly]
    pool = exact or plateau
    choice = min(pool, key=lambda r: r.micro_batch_size)
    fastest = min(usable, key=cost)
    what = "projected wall-clock" if choice.projected_seconds is not None else "time per sample"
    if choice is fastest:
        reason = f"shortest {what} among the eligible rows"
    else:
        loss = 100 * (cost(choice) / best - 1)
        reason = (
            f"smallest micro-batch within {PLATEAU:.0%} of the best {what} "
            f"(micro-batch {fastest.micro_batch_size}; {loss:.1f}% slower)"
        )
        if exact and not fastest.divides_exactly:
            reason += ", and its global batch is exactly the target"
    faster = [r for r in rows if not r.eligible and cost(r) < cost(choice)]
    if faster:
        quickest = min(faster, key=cost)
        reason += (
            f"; micro-batch {quickest.micro_batch_size} would be "
            f"{100 * (1 - cost(quickest) / cost(choice)):.0f}% faster but is excluded "
            f"({quickest.excluded_because})"
        )
    shaky = [r for r in plateau if not r.timing_stable]
    if shaky:
        worst = max(shaky, key=lambda r: r.spread)
        reason += (
            f"; timings unstable (micro-batch {worst.micro_batch_size} varied by "
            f"{worst.spread:.0%}): the machine was busy, the pick may differ on a quiet one"
        )
    return choice, reason


def make_plan(measurements: Sequence[Measurement], settings: PlanSettings) -> Plan:
    rows = apply_rules(
        [make_row(m, settings) for m in sorted(measurements, key=lambda m: m.micro_batch_size)],
        settings,
    )
    choice, reason = recommend(rows)
    return Plan(rows, choice, settings, tuple(plan_warnings(rows, choice, settings)), reason)


def plan_warnings(rows: Sequence[Row], choice: Row | None, s: PlanSettings) -> list[str]:
    """The seeds of trouble we know of, for the recommended row (or all rows)."""
    out: list[str] = []
    if s.target_note:
        out.append(s.target_note)
    if choice is None and not rows:
        return out
    if choice is None:
        out.append(
            f"no micro-batch keeps peak memory within headroom {s.headroom:.0%} of the limit; "
            "lower plan.headroom only if you accept the risk, or reduce memory "
            "(precision, gradient checkpointing)"
        )
        return out
    if choice.global_batch_size != s.target_global_batch:
        out.append(
            f"the target global batch {s.target_global_batch} is not a multiple of micro-batch "
            f"{choice.micro_batch_size} x {s.world_size} rank(s): the realised global batch is "
            f"{choice.global_batch_size}"
        )
    if s.has_batchnorm and choice.grad_accum_steps > 1 and choice.micro_batch_size < SMALL_BN_BATCH:
        out.append(
            f"BatchNorm sees micro-batches of {choice.micro_batch_size}, not the global batch: "
            "its statistics get noisy below ~16 samples (use GroupNorm/LayerNorm, SyncBatchNorm "
            "across ranks, or a larger micro-batch)"
        )
    if choice.grad_accum_steps > MAX_ACCUM:
        out.append(
            f"{choice.grad_accum_steps} accumulation steps per update: the optimizer runs rarely "
            "and each update takes long; consider more devices or a smaller global batch"
        )
    if choice.lr_ratio is not None and choice.lr_ratio >= 8 and s.lr_rule != "none":
        out.append(
            f"the batch is {choice.lr_ratio:g}x the base batch: warm-up is {choice.warmup} "
            f"(Goyal et al. 2017 ramp the LR over the first 5 epochs); the recommendation "
            f"includes {choice.warmup_steps if choice.warmup_steps is not None else 'a'} warm-up steps"
        )
    if s.epoch_samples is not None and choice.global_batch_size > s.epoch_samples:
        out.append(
            f"the global batch {choice.global_batch_size} exceeds the data set "
            f"({s.epoch_samples} samples per epoch): each optimizer step would see samples twice"
        )
    elif s.epoch_samples is not None and choice.optimizer_steps is not None:
        per_epoch = s.epoch_samples / choice.global_batch_size
        if per_epoch < 10:
            out.append(
                f"only {per_epoch:.1f} optimizer steps per epoch at global batch "
                f"{choice.global_batch_size}: few updates for the data seen"
            )
    if not choice.timing_stable:
        out.append(
            f"timing at micro-batch {choice.micro_batch_size} varied by {choice.spread:.0%} "
            "(interquartile range): the machine was busy; rerun for firmer numbers"
        )
    return out
