"""The training step's options, each run for real on the CPU."""

from __future__ import annotations

import pytest
import torch

from batchprobe.probe import run_probe
from batchprobe.search import Outcome
from batchprobe.timing import time_sizes

from helpers import peak_at, session

MLP = {"kwargs": {"in_features": 256, "hidden": 512, "depth": 2}}


def test_optimizer_state_follows_the_optimizer() -> None:
    peaks = {
        name: peak_at(session("zoo:mlp", model=MLP, train={"optimizer": name}), 8)
        for name in ("none", "sgd", "adam", "adamw")
    }
    s = session("zoo:mlp", model=MLP)
    params = sum(p.numel() * p.element_size() for p in s.step.parameters())
    assert peaks["none"] <= peaks["sgd"]  # plain SGD keeps no state
    assert peaks["adam"] == peaks["adamw"]  # two moments each
    assert peaks["adam"] - peaks["sgd"] >= 2 * params * 0.99


def test_sgd_momentum_adds_one_buffer() -> None:
    plain = peak_at(session("zoo:mlp", model=MLP, train={"optimizer": {"name": "sgd"}}), 8)
    momentum = peak_at(
        session("zoo:mlp", model=MLP, train={"optimizer": {"name": "sgd", "momentum": 0.9}}), 8
    )
    params = sum(
        p.numel() * p.element_size() for p in session("zoo:mlp", model=MLP).step.parameters()
    )
    assert momentum - plain == pytest.approx(params, rel=0.05)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_saves_activation_memory(precision: str) -> None:
    gpt = {"kwargs": {"n_layer": 2, "n_embd": 128, "vocab_size": 512}}
    fp32 = peak_at(session("zoo:gpt", model=gpt), 16)
    mixed_session = session("zoo:gpt", model=gpt, train={"precision": precision})
    mixed = peak_at(mixed_session, 16)
    assert mixed < fp32
    if precision == "fp16":
        mixed_session.step.begin()
        assert mixed_session.step.scaler is not None  # fp16 adds a GradScaler
        mixed_session.step.end()


def test_gradient_checkpointing_saves_activation_memory() -> None:
    gpt = {"kwargs": {"n_layer": 4, "n_embd": 128, "vocab_size": 512}}
    plain = peak_at(session("zoo:gpt", model=gpt), 16)
    checkpointed = peak_at(
        session("zoo:gpt", model=gpt, train={"gradient_checkpointing": True}), 16
    )
    assert checkpointed < plain * 0.9


def test_channels_last_images() -> None:
    s = session("zoo:cnn", train={"channels_last": True})
    batch = s.step.make_batch(2)
    assert batch.args[0].is_contiguous(memory_format=torch.channels_last)
    assert run_probe(s.step, s.backend, 8).outcome is Outcome.FIT


@pytest.mark.slow
def test_compiled_model_is_timed_compiled() -> None:
    import torch._dynamo.utils as dynamo_utils

    s = session(
        "zoo:mlp",
        model={"kwargs": {"in_features": 64, "hidden": 64, "depth": 2}},
        train={"compile": True},
    )
    assert run_probe(s.step, s.backend, 4).outcome is Outcome.FIT
    dynamo_utils.counters.clear()
    timing = time_sizes(s.step, s.backend, [4], min_time_s=0.05)[4]
    assert dynamo_utils.counters["frames"]["ok"] >= 1  # a graph was compiled and run
    assert timing.warmup_steps >= 3  # compilation happened in the warm-up, not the figures
