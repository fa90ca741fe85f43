from __future__ import annotations

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
        (2, "none"),
        (4, "suggested"),
        (8, "required"),
        (16, "critical"),
        (64, "critical"),
    ],
)
def test_warmup_grows_with_the_ratio(ratio: float, level: str) -> None:
    assert warmup_level(ratio) == level


def test_warmup_steps_are_a_share_of_the_run() -> None:
    assert warmup_steps("none", 1000) == 0
    assert warmup_steps("required", 1000) == 56  # Goyal: 5 of 90 epochs
    assert warmup_steps("critical", 1000) == 100
    assert warmup_steps("suggested", None) is None


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
    assert row.warmup_steps == math.ceil(0.02 * 977)
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
