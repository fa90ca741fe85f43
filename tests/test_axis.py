"""find-max along the sequence length: the longest context that trains at a micro-batch, exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchprobe.cli import app
from batchprobe.probe import run_probe
from batchprobe.search import Outcome

from helpers import session

runner = CliRunner()
KWARGS = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "block_size": 512}


def _spec(tmp_path: Path, budget: str, block_size: int = 512) -> Path:
    path = tmp_path / "gpt.yaml"
    kwargs = {**KWARGS, "block_size": block_size}
    path.write_text(
        json.dumps(
            {"model": {"source": "zoo:gpt", "kwargs": kwargs},
             "probe": {"device": "cpu", "memory_budget": budget}}
        )
    )  # fmt: skip
    return path


def test_the_longest_sequence_at_a_micro_batch_is_exact(tmp_path: Path) -> None:
    path = _spec(tmp_path, "16MiB")
    args = ["find-max", "--config", str(path), "--axis", "seq_len", "--batch-size", "4", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    best = data["max_seq_len"]
    assert data["axis"] == "seq_len" and data["exact"] and not data["capped"]
    assert data["batch_size"] == data["max_batch_size"] == 4 and 1 < best < 512
    outcomes = {p["seq_len"]: p["outcome"] for p in data["probes"]}
    assert outcomes[best] == "fit" and outcomes[best + 1] == "oom"
    assert all(p["batch_size"] == 4 for p in data["probes"])
    assert data["peak_breakdown"]["seq_len"] == best
    # the same two facts through the batch axis, with the spec's seq_len set to each length
    for seq_len, fits in ((best, True), (best + 1, False)):
        s = session("zoo:gpt", "16MiB", model={"kwargs": KWARGS}, inputs={"seq_len": seq_len})
        assert (run_probe(s.step, s.device, 4).outcome is Outcome.FIT) is fits


def test_the_search_stops_at_the_model_s_maximum_positions(tmp_path: Path) -> None:
    path = _spec(tmp_path, "256MiB", block_size=48)
    args = ["find-max", "--config", str(path), "--axis", "seq_len", "--batch-size", "2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["max_seq_len"] == 48 and data["capped"]
    assert max(p["seq_len"] for p in data["probes"]) == 48  # never past the position table


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["find-max", "--model", "zoo:gpt", "--axis", "seq_len"], "probe.batch_size"),
        (["find-max", "--model", "zoo:gpt", "--batch-size", "4"], "probe.batch_size"),
        (["find-max", "--model", "zoo:mlp", "--axis", "seq_len", "--batch-size", "4"], "probe.axis"),
        (["plan", "--model", "zoo:gpt", "--set", "probe.axis=seq_len", "--set",
          "probe.batch_size=4"], "probe.axis"),
    ],
)  # fmt: skip
def test_an_axis_that_cannot_apply_is_named(args: list[str], key: str) -> None:
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output


def test_nothing_fits_along_seq_len_exits_4_with_nulls(tmp_path: Path) -> None:
    path = _spec(tmp_path, "1MiB")  # less than the model's parameters and their gradients
    args = ["find-max", "--config", str(path), "--axis", "seq_len", "--batch-size", "4", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 4, result.output
    data = json.loads(result.stdout)
    assert data["max_seq_len"] is None and data["max_batch_size"] is None
    assert data["probes"] and all(p["outcome"] == "oom" for p in data["probes"])
    assert "seq_len 1 at micro-batch 4 does not fit" in result.output
