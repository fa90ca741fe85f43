"""torchrun on the CPU with gloo: two ranks agree on every probe, and one of them speaks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cpu_fsdp

pytestmark = pytest.mark.slow  # each test here takes seconds

ROOT = Path(__file__).parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [
        TORCHRUN,
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "batchprobe",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(
    args: list[str], envs: list[dict[str, str]], timeout: float = 300
) -> list[subprocess.CompletedProcess[str]]:
    """Start one process per entry of `envs` as torchrun does (RANK, WORLD_SIZE, MASTER_*),
    each with its own extra environment, and wait for all of them."""
    port = _free_port()
    procs = []
    for rank, extra in enumerate(envs):
        env = _env() | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(envs)),
            "LOCAL_WORLD_SIZE": str(len(envs)), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **extra,
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "batchprobe", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
        )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def launch_ranks(
    args: list[str], budgets: list[str], timeout: float = 300
) -> tuple[list[str], float]:
    """The ranks, each with its own budget: their outputs (all must succeed) and the seconds."""
    started = time.perf_counter()
    done = start_ranks(args, [{"BATCHPROBE_MEMORY_BUDGET": b} for b in budgets], timeout)
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return [d.stdout for d in done], time.perf_counter() - started


def test_find_max_under_torchrun_prints_one_agreed_result() -> None:
    done = torchrun(
        "find-max", "--model", "zoo:mlp", "--device", "cpu", "--memory-budget", "96MiB", "--json"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"command"') == 1  # rank 0 alone speaks
    assert done.stderr.count("Max micro-batch") == 1
    data = json.loads(done.stdout)
    assert data["world_size"] == 2 and data["exact"]
    outcomes = {p["batch_size"]: p["outcome"] for p in data["probes"]}
    assert (
        outcomes[data["max_batch_size"]] == "fit" and outcomes[data["max_batch_size"] + 1] == "oom"
    )


def test_ranks_with_different_memory_agree_on_the_smaller_answer_promptly() -> None:
    args = ["find-max", "--model", "zoo:mlp", "--device", "cpu", "--json", "--strategy", "doubling",
            "--set", "probe.collective_timeout_s=120"]  # fmt: skip
    (mixed0, mixed1), mixed_s = launch_ranks(args, ["96MiB", "72MiB"])
    (small0, _), _ = launch_ranks(args, ["72MiB", "72MiB"])
    assert mixed1 == ""  # only rank 0 prints
    mixed, small = json.loads(mixed0), json.loads(small0)
    assert mixed["max_batch_size"] == small["max_batch_size"]  # the smaller rank decides
    assert mixed["exact"] and mixed["world_size"] == 2
    failed = [p for p in mixed["probes"] if p["outcome"] == "oom"]
    assert failed and all(p["message"].startswith("rank 1:") for p in failed)
    # no probe waited for a collective timeout (120 s): the OOMs were agreed at once
    assert mixed_s < 120


def test_plan_under_torchrun_uses_the_world_size_and_measured_multi_rank_steps() -> None:
    done = torchrun(
        "plan", "--config", QUICKSTART, "--device", "cpu", "--json",
        "--set", "plan.min_time_s=0.2", "--set", "plan.candidates=[4, 16]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"command": "plan"') == 1
    data = json.loads(done.stdout)
    assert data["world_size"] == 2
    for row in data["rows"]:
        micro, accum = row["micro_batch_size"], row["grad_accum_steps"]
        assert accum == -(-1024 // (micro * 2))  # ceil(target / (micro x world))
        assert row["global_batch_size"] == micro * accum * 2
        nosync = row["fwd_bwd_nosync_time_s"]
        assert nosync is not None and nosync > 0
        expected = (accum - 1) * nosync + row["fwd_bwd_time_s"] + row["optimizer_time_s"]
        assert row["update_time_s"] == pytest.approx(expected)
    assert not any("is not in the figures" in w for w in data["warnings"])


@cpu_fsdp
def test_fsdp_sharding_shows_in_the_per_rank_peak() -> None:
    peaks = {}
    for parallel in ("ddp", "fsdp"):
        done = torchrun(
            "find-max", "--model", "zoo:mlp", "--device", "cpu", "--memory-budget", "96MiB", "--json",
            "--strategy", "doubling", "--max-batch-size", "4", "--set", f"train.parallel={parallel}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        data = json.loads(done.stdout)
        peaks[parallel] = {p["batch_size"]: p["peak_bytes"] for p in data["probes"]}
    # parameters, gradients and AdamW state of a ~2M-parameter MLP are split over two ranks
    assert peaks["fsdp"][4] < peaks["ddp"][4] * 0.8


def test_parallel_without_torchrun_is_bad_input() -> None:
    from typer.testing import CliRunner

    from batchprobe.cli import app

    result = CliRunner().invoke(
        app, ["find-max", "--model", "zoo:mlp", "--device", "cpu", "--set", "train.parallel=ddp"]
    )
    assert result.exit_code == 2 and "run under torchrun" in result.stderr
