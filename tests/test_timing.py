from __future__ import annotations

import pytest
import torch

from batchprobe.timing import count_flops, flops_per_sample, relative_spread, time_steps

from helpers import session


@pytest.fixture(scope="module")
def mlp():
    return session("zoo:mlp", model={"kwargs": {"in_features": 784, "hidden": 1024, "depth": 2}})


def test_throughput_rises_with_batch_and_fwd_bwd_time_grows(mlp) -> None:
    # At batch 1 the fixed cost (optimizer step over ~2M parameters, Python, kernel launches)
    # dominates; at 128 the same fixed cost is shared by 128 samples.
    small = time_steps(mlp.step, mlp.backend, 1, min_time_s=0.3)
    large = time_steps(mlp.step, mlp.backend, 128, min_time_s=0.3)
    assert large.fwd_bwd_s > small.fwd_bwd_s
    assert 128 / large.step_s > 2 * (1 / small.step_s)
    for t in (small, large):
        assert t.warmup_steps >= 3 and t.timed_steps >= 5
        assert t.step_s == pytest.approx(t.fwd_bwd_s + t.optimizer_s, rel=0.5)


def test_timing_leaves_no_gradients_or_optimizer_state(mlp) -> None:
    time_steps(mlp.step, mlp.backend, 4, min_time_s=0.05)
    assert mlp.step.optimizer is None
    assert all(p.grad is None for p in mlp.step.parameters())


def test_flops_are_counted_and_linear_in_batch(mlp) -> None:
    fixed, per_sample, conv_share = flops_per_sample(mlp.step)
    assert conv_share == 0.0
    weights = [m.weight.numel() for m in mlp.step.model.modules() if isinstance(m, torch.nn.Linear)]
    # per sample: 2 FLOPs per weight forward, 2 for the weight gradient, 2 for the input
    # gradient — except the first layer, whose input (the data) needs no gradient
    assert per_sample == 6 * sum(weights) - 2 * weights[0]
    assert count_flops(mlp.step, 8)[0] == pytest.approx(fixed + 8 * per_sample, rel=1e-6)


def test_relative_spread() -> None:
    assert relative_spread([1.0, 1.0, 1.0, 1.0, 1.0]) == 0.0
    assert relative_spread([1.0, 1.0, 1.0, 2.0, 2.0]) > 0.5
