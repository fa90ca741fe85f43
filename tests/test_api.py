"""The Python API, one test per call the README documents."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchprobe
from batchprobe.errors import SpecError


def test_a_model_in_memory_with_a_batch_function() -> None:
    # seen: find_max_batch_size(nn.Linear(10, 10)) failed with AttributeError
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batch(b: int, device: torch.device):
        return torch.randn(b, 784, device=device), torch.randint(0, 10, (b,), device=device)

    result = batchprobe.find_max_batch_size(
        model, batch, loss="cross_entropy", device="cpu", memory_budget="64MiB"
    )
    best = result.max_batch_size
    assert best is not None and best > 1
    outcomes = {p.batch_size: p.outcome.value for p in result.probes}
    assert outcomes[best] == "fit" and outcomes[best + 1] == "oom"  # exact
    # the caller's model is untouched: probes trained a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_linear_model_needs_no_batch_function() -> None:
    result = batchprobe.find_max_batch_size(nn.Linear(10, 10), device="cpu", memory_budget="8MiB")
    best = result.max_batch_size
    assert best is not None
    assert {p.batch_size for p in result.probes} >= {best, best + 1}


def test_a_custom_loss_function_and_overrides() -> None:
    calls = []

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(out.shape[0])
        return (out - target).pow(2).mean()

    result = batchprobe.find_max_batch_size(
        nn.Linear(32, 4),
        lambda b, d: (torch.randn(b, 32, device=d), torch.randn(b, 4, device=d)),
        loss=loss,
        device="cpu",
        memory_budget="4MiB",
        max_batch_size=64,
        overrides=["probe.strategy=doubling"],
    )
    assert result.max_batch_size == 64 and result.search.capped
    assert 64 in calls


def test_a_model_reference_and_a_spec() -> None:
    by_name = batchprobe.find_max_batch_size("zoo:mlp", device="cpu", memory_budget="64MiB")
    spec = batchprobe.load_spec(None, ["model.source=zoo:mlp", "probe.device=cpu",
                                       "probe.memory_budget=64MiB"])  # fmt: skip
    assert batchprobe.find_max_batch_size(spec).max_batch_size == by_name.max_batch_size


def test_a_model_without_inputs_is_told_to_pass_a_batch_function() -> None:
    with pytest.raises(SpecError, match="batch function"):
        batchprobe.find_max_batch_size(nn.Conv2d(3, 8, 3), device="cpu", memory_budget="8MiB")


def test_the_optimizer_keyword_takes_a_name_or_settings() -> None:
    # SGD without momentum keeps no state; AdamW keeps two tensors per parameter: less room
    common = {"device": "cpu", "memory_budget": "48MiB"}
    sgd = batchprobe.find_max_batch_size(nn.Linear(1000, 1000), optimizer="sgd", **common)
    adamw = batchprobe.find_max_batch_size(
        nn.Linear(1000, 1000), optimizer={"name": "adamw", "lr": 1e-3}, **common
    )
    assert sgd.max_batch_size is not None and adamw.max_batch_size is not None
    assert sgd.max_batch_size > adamw.max_batch_size
