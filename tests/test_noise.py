from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from batchprobe.cli import app
from batchprobe.examples import regression_noise_scale
from batchprobe.flows.noise import run as run_noise
from batchprobe.results import NoiseStats, samples_factor, steps_factor
from batchprobe.session import open_session
from batchprobe.spec import load_spec

ROOT = Path(__file__).parent.parent
runner = CliRunner()


def _linreg(noise_std: float, **noise: int) -> object:
    text = json.dumps(
        {
            "model": {"source": "zoo:linreg", "kwargs": {"in_features": 32}},
            "data": {
                "source": "batchprobe.examples:regression_batches",
                "kwargs": {"noise_std": noise_std},
            },
            "probe": {"device": "cpu"},
            "noise": noise,
        }
    )
    return open_session(load_spec(text=text))


@pytest.mark.parametrize("noise_std", [0.5, 1.0, 3.0])
def test_estimate_matches_the_closed_form_noise_scale(noise_std: float) -> None:
    session = _linreg(noise_std)
    exact = regression_noise_scale(session.step.model.linear.weight, noise_std)  # type: ignore[attr-defined]
    run = run_noise(session)  # type: ignore[arg-type]
    assert run.stats.steps == 100
    assert run.b_simple == pytest.approx(exact, rel=0.2)
    assert 0 < run.stats.stderr() < 0.2 * exact


def test_the_true_noise_scale_differs_enough_between_cases() -> None:
    # the test above would be weak if every case had the same answer
    w = torch.zeros(32)
    assert regression_noise_scale(w, 3.0) > 3 * regression_noise_scale(w, 0.5)


def test_estimator_recovers_exact_expectations() -> None:
    g2, trace, bs, bb = 2.5, 400.0, 8, 64
    stats = NoiseStats(bs, bb)
    for _ in range(10):
        stats.add(g2 + trace / bs, g2 + trace / bb)
    assert stats.g2() == pytest.approx(g2)
    assert stats.trace_sigma() == pytest.approx(trace)
    assert stats.b_simple() == pytest.approx(trace / g2)
    assert stats.stderr() == pytest.approx(0, abs=1e-9)


def test_unresolved_gradient_is_said() -> None:
    from rich.console import Console

    from batchprobe.report.json import noise_json
    from batchprobe.report.noise import noise_panel
    from batchprobe.results import NoiseRun

    stats = NoiseStats(8, 64)
    for _ in range(5):  # the big batch's norm is far below the small one's: |G|^2 estimate < 0
        stats.add(10.0, 0.5)
    assert stats.g2() < 0 and stats.b_simple() == math.inf
    run = NoiseRun(
        stats,
        1.0,
        open_session(
            load_spec(text="model: {source: zoo:mlp}\nprobe: {device: cpu}")
        ).backend.info(),
    )
    console = Console(record=True, width=100)
    console.print(noise_panel(run, "zoo:mlp"))
    assert "not resolved" in console.export_text()
    assert noise_json(run, "zoo:mlp")["b_simple"] is None


def test_step_and_sample_factors() -> None:
    assert steps_factor(100, 100) == 2 and samples_factor(100, 100) == 2
    assert steps_factor(400, 100) == pytest.approx(1.25)
    assert samples_factor(25, 100) == pytest.approx(1.25)


def test_a_dataset_source_is_loaded_in_epochs() -> None:
    text = (
        "model: {source: zoo:linreg, kwargs: {in_features: 32}}\n"
        "data: {source: user_models:regression_dataset, kwargs: {n: 512}}\n"
        "probe: {device: cpu}\nnoise: {steps: 20}\n"
    )
    run = run_noise(open_session(load_spec(text=text)))
    assert run.stats.steps == 20  # 20 x 64 samples = 2.5 epochs of 512
    assert math.isfinite(run.b_simple) and run.b_simple > 1


def test_noise_scale_cli_on_the_builtin_example() -> None:
    result = runner.invoke(
        app,
        [
            "noise-scale",
            "--config",
            str(ROOT / "configs" / "noise-linreg.yaml"),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["command"] == "noise-scale" and data["steps"] == 100
    assert data["b_simple"] > 0 and 0 < data["b_simple_stderr"] < data["b_simple"]
    assert "What it means" in result.stderr and "critical batch size" in result.stderr


def test_synthetic_data_is_refused_with_the_reason() -> None:
    result = runner.invoke(app, ["noise-scale", "--model", "zoo:mlp", "--device", "cpu"])
    assert result.exit_code == 2
    assert "needs real data" in result.stderr and "no signal" in result.stderr


def test_a_bad_data_batch_is_bad_input() -> None:
    result = runner.invoke(
        app,
        [
            "noise-scale",
            "--model",
            "zoo:linreg",
            "--device",
            "cpu",
            "--set",
            "data.source=user_models:strings",
        ],
    )
    assert result.exit_code == 2 and "data.source" in result.stderr


def test_plan_shows_the_noise_scale_and_warns_far_above_it() -> None:
    result = runner.invoke(
        app,
        ["plan", "--config", str(ROOT / "configs" / "noise-linreg.yaml"), "--device", "cpu", "--json",
         "--set", "plan.min_time_s=0.1", "--set", "plan.candidates=[64, 256, 1024]"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    b = data["noise_scale"]["b_simple"]
    assert 20 < b < 200
    assert data["recommended"]["global_batch_size"] == 1024
    assert any("gradient noise scale" in w for w in data["warnings"])
    assert "noise-scale" in result.stderr
