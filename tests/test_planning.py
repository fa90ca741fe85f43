from __future__ import annotations

import itertools
import math

import pytest

from batchprobe.planning import (
    Measurement,
    PlanSettings,
    grad_accum_steps,
    make_plan,
    make_row,
    realised_global_batch,
    recommend,
    resolve_lr_rule,
    scaled_lr,
    warmup_level,
    warmup_steps,
)


def test_tokens_example_from_the_issue() -> None:
    # 32768 tokens per step at seq_len 256 = 128 sequences; micro 16 on one GPU -> 8 steps
    assert grad_accum_steps(32768 // 256, 16, 1) == 8


def test_accumulation_rounds_up_and_reports_realised_global() -> None:
    assert grad_accum_steps(100, 16, 2) == 4
    assert realised_global_batch(16, 4, 2) == 128
    assert grad_accum_steps(512, 512, 1) == 1
    assert grad_accum_steps(512, 1000, 1) == 1
    with pytest.raises(ValueError):
        grad_accum_steps(0, 16, 1)


def test_linear_and_sqrt_scaling() -> None:
    assert scaled_lr(0.1, 32, 128, "linear") == pytest.approx(0.4)  # the issue's example
    assert scaled_lr(3e-4, 256, 1024, "sqrt") == pytest.approx(6e-4)
    assert scaled_lr(0.1, 256, 64, "linear") == pytest.approx(0.025)
    assert scaled_lr(0.1, 256, 4096, "none") == 0.1


def test_auto_rule_follows_the_optimizer() -> None:
    assert resolve_lr_rule("auto", "adamw") == "sqrt"
    assert resolve_lr_rule("auto", "adam") == "sqrt"
    assert resolve_lr_rule("auto", "sgd") == "linear"
    assert resolve_lr_rule("auto", "none") == "none"
    assert resolve_lr_rule("linear", "adamw") == "linear"


@pytest.mark.parametrize(
    ("ratio", "level"),
    [
        (0.5, "none"),
        (1, "none"),
        (2, "suggested"),
        (4, "suggested"),
        (8, "required"),
        (16, "critical"),
        (64, "critical"),
    ],
)
def test_warmup_grows_with_the_ratio(ratio: float, level: str) -> None:
    assert warmup_level(ratio) == level


def test_warmup_steps_are_a_share_of_the_run() -> None:
    assert warmup_steps(None, 1000) == 0
    assert warmup_steps(1.0, 1000) == 0
    assert warmup_steps(0.5, 1000) == 0
    assert warmup_steps(4.0, 1000) == 50  # half way (in log2) to 16x: 5% of the steps
    assert warmup_steps(16.0, 1000) == 100
    assert warmup_steps(64.0, 1000) == 100
    assert warmup_steps(4.0, None) is None


def test_warmup_steps_do_not_jump_between_neighbouring_global_batches() -> None:
    # seen: 0 warm-up steps at global batch 512 and 19 at 532 (base 256)
    settings = PlanSettings(
        target_global_batch=512, base_lr=0.1, base_batch_size=256, lr_rule="linear",
        total_samples=500_000,
    )  # fmt: skip
    steps = []
    for micro in range(500, 541):
        row = make_row(Measurement(micro, None, 0.1, 0.01), settings)
        steps.append((row.global_batch_size, row.warmup_steps))
    for (g0, w0), (g1, w1) in itertools.pairwise(steps):
        assert w0 is not None and w1 is not None
        # fewer optimizer steps at a larger batch, more of them warm-up: a few steps apart
        assert abs(w1 - w0) <= max(2, 0.1 * w0), (g0, w0, g1, w1)


def test_row_math_matches_a_hand_worked_example() -> None:
    # global 1024 samples, micro 128, one GPU: 8 accumulation steps; fwd+bwd 0.1 s, optimizer
    # 0.05 s -> an update takes 8*0.1 + 0.05 = 0.85 s; 1e6 samples: ceil(976.5625) = 977 steps
    settings = PlanSettings(
        target_global_batch=1024, tokens_per_sample=256, base_lr=0.1, base_batch_size=256,
        lr_rule="linear", total_samples=1e6, limit_bytes=10_000, headroom=0.9, peak_flops=1e12,
    )  # fmt: skip
    row = make_row(Measurement(128, 8_000, 0.1, 0.05, flops=2e10), settings)
    assert row.grad_accum_steps == 8
    assert row.global_batch_size == 1024
    assert row.update_time_s == pytest.approx(0.85)
    assert row.optimizer_steps == 977
    assert row.projected_seconds == pytest.approx(977 * 0.85)
    assert row.samples_per_s == pytest.approx(1024 / 0.85)
    assert row.tokens_per_s == pytest.approx(1024 * 256 / 0.85)
    assert row.lr == pytest.approx(0.4)
    assert row.warmup == "suggested"  # ratio 4
    assert row.warmup_steps == math.ceil(0.05 * 977)
    assert row.mfu == pytest.approx(8 * 2e10 / (0.85 * 1e12))
    assert row.peak_fraction == pytest.approx(0.8)
    assert row.within_headroom and row.divides_exactly


def test_every_row_reaches_the_target() -> None:
    settings = PlanSettings(target_global_batch=1000, world_size=3)
    for micro in (1, 7, 16, 64, 333, 1000):
        row = make_row(Measurement(micro, None, 0.01, 0.001), settings)
        assert row.global_batch_size >= 1000
        assert row.global_batch_size - micro * 3 < 1000  # one accumulation step fewer would miss


def _plan(times: dict[int, float], target: int = 256, **kw):
    ms = [Measurement(b, 1000 * b, t, 0.01) for b, t in times.items()]
    return make_plan(ms, PlanSettings(target_global_batch=target, total_samples=1e5, **kw))


def test_recommendation_is_the_smallest_on_the_plateau() -> None:
    # per-sample time: 1 -> 10 ms, 8 -> 2 ms, 16 -> 1.01 ms, 32 -> 1.0 ms: 16 is within 3% of 32
    plan = _plan({1: 0.010, 8: 0.016, 16: 0.01616, 32: 0.032})
    assert plan.recommended is not None
    assert plan.recommended.micro_batch_size == 16
    assert "micro-batch 32" in plan.reason


def test_recommendation_respects_headroom() -> None:
    plan = _plan({8: 0.016, 64: 0.06, 128: 0.1}, limit_bytes=100_000, headroom=0.9)
    assert plan.recommended is not None
    assert plan.recommended.micro_batch_size == 64  # 128 would be 128 kB > 90 kB
    rows = {r.micro_batch_size: r for r in plan.rows}
    assert not rows[128].within_headroom


def test_recommendation_prefers_exact_division_on_the_plateau() -> None:
    # 96 does not divide 256 (realised 288); 64 does and is as fast per sample
    plan = _plan({64: 0.064, 96: 0.0955})
    assert plan.recommended is not None
    assert plan.recommended.micro_batch_size == 64


def test_no_recommendation_when_nothing_is_within_headroom() -> None:
    plan = _plan({8: 0.016}, limit_bytes=1000, headroom=0.5)
    choice, reason = recommend(plan.rows)
    assert choice is None and "headroom" in reason
    assert any("headroom" in w for w in plan.warnings)


def test_warnings_for_known_trouble() -> None:
    ms = [Measurement(4, 100, 0.01, 0.001)]
    settings = PlanSettings(
        target_global_batch=1024, base_lr=0.1, base_batch_size=64, lr_rule="linear",
        has_batchnorm=True, epoch_samples=500, total_samples=500,
    )  # fmt: skip
    warnings = " | ".join(make_plan(ms, settings).warnings)
    assert "BatchNorm sees micro-batches of 4" in warnings
    assert "256 accumulation steps" in warnings
    assert "16x the base batch: warm-up is critical" in warnings
    assert "exceeds the data set (500 samples per epoch)" in warnings


def test_rounded_global_batch_is_said() -> None:
    plan = make_plan([Measurement(96, 1, 0.1, 0.01)], PlanSettings(target_global_batch=1024))
    assert plan.recommended is not None and plan.recommended.global_batch_size == 1056
    assert any("realised global batch is 1056" in w for w in plan.warnings)


def test_batchnorm_floor_is_a_rule_of_the_pick_not_only_a_warning() -> None:
    # seen: micro-batch 1 recommended for a BatchNorm model while warning about BatchNorm below 16
    times = {1: 0.002, 2: 0.0045, 4: 0.009, 8: 0.019, 16: 0.04, 32: 0.08}
    plan = _plan(times, has_batchnorm=True)
    assert plan.recommended is not None
    assert plan.recommended.micro_batch_size == 16
    rows = {r.micro_batch_size: r for r in plan.rows}
    for b in (1, 2, 4, 8):
        assert not rows[b].eligible and "BatchNorm" in (rows[b].excluded_because or "")
        assert rows[b].to_dict()["excluded_because"] == rows[b].excluded_because
    assert rows[16].eligible and rows[32].eligible
    assert "micro-batch 1 would be" in plan.reason and "BatchNorm" in plan.reason
    assert not any("BatchNorm sees" in w for w in plan.warnings)


def test_batchnorm_floor_gives_way_when_memory_leaves_nothing_else() -> None:
    plan = _plan({1: 0.002, 2: 0.0045, 4: 0.009}, target=16, has_batchnorm=True)
    assert plan.recommended is not None and plan.recommended.micro_batch_size == 1
    assert all(r.eligible for r in plan.rows)
    assert any("BatchNorm sees micro-batches of 1" in w for w in plan.warnings)


def test_accumulation_ceiling_is_a_rule_of_the_pick() -> None:
    # seen: 512 accumulation steps recommended while warning that this is too many
    plan = _plan({1: 0.001, 4: 0.0045, 8: 0.0095, 16: 0.02}, target=512)
    assert plan.recommended is not None
    assert plan.recommended.grad_accum_steps <= 64
    rows = {r.micro_batch_size: r for r in plan.rows}
    assert "512 accumulation steps" in (rows[1].excluded_because or "")
    assert "128 accumulation steps" in (rows[4].excluded_because or "")
    assert not any("accumulation steps per update" in w for w in plan.warnings)


def test_every_row_the_pick_skipped_says_why() -> None:
    plan = _plan(
        {8: 0.008, 64: 0.06, 128: 0.1, 600: 0.5}, limit_bytes=200_000, headroom=0.9, target=256
    )
    rows = {r.micro_batch_size: r for r in plan.rows}
    assert "headroom" in (rows[600].excluded_because or "")  # 600 kB > 180 kB
    assert rows[128].eligible and rows[64].eligible and rows[8].eligible
    assert [r.eligible for r in plan.rows] == [r.to_dict()["eligible"] for r in plan.rows]
    plan = _plan({64: 0.06, 512: 0.4}, target=256)
    assert "overshoots the target 256" in (plan.rows[1].excluded_because or "")


def test_a_pick_from_unstable_timings_says_so_in_its_reason() -> None:
    settings = PlanSettings(target_global_batch=256, total_samples=1e5)
    steady = [Measurement(b, None, 0.001 * b, 0.01, spread=0.02) for b in (8, 16, 32)]
    assert "unstable" not in make_plan(steady, settings).reason
    shaky = [Measurement(b, None, 0.001 * b, 0.01, spread=0.4) for b in (8, 16, 32)]
    plan = make_plan(shaky, settings)
    assert "unstable" in plan.reason and "40%" in plan.reason
    assert all(not r.timing_stable and r.to_dict()["timing_stable"] is False for r in plan.rows)


def test_a_row_far_above_the_target_is_not_picked_when_a_closer_one_exists() -> None:
    # seen: micro-batch 471 x 2 = global 942 recommended for a target of 512
    plan = _plan({128: 0.6, 256: 1.3, 471: 2.2}, target=512)
    rows = {r.micro_batch_size: r for r in plan.rows}
    assert "942 is 84% above the target" in (rows[471].excluded_because or "")
    assert plan.recommended is not None and plan.recommended.global_batch_size == 512
    alone = _plan({471: 2.2}, target=512)  # nothing closer: it stays eligible
    assert alone.recommended is not None and alone.recommended.micro_batch_size == 471
