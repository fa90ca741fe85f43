"""The scripts under scripts/ run, and what they write holds together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import ROOT, _env


@pytest.mark.slow
def test_the_gpu_report_on_the_simulated_gpu(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "model: {source: zoo:gpt, kwargs: {n_layer: 2, n_head: 2, n_embd: 64, vocab_size: 512, "
        "block_size: 32}}\nprobe: {memory_budget: 96MiB}\n"
    )
    sim = {"total_bytes": "256MiB", "context_bytes": "16MiB", "capability": [8, 0]}
    env = _env() | {"BATCHPROBE_SIMULATE_CUDA": json.dumps(sim)}
    done = subprocess.run(
        [sys.executable, "scripts/gpu_report.py", str(spec), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (row,) = report["configs"]
    assert "error" not in row, row
    c = row["comparison"]
    assert c["batch_size"] == row["find_max"]["max_batch_size"] > 1
    assert c["allocated_peak_bytes"] <= c["reserved_peak_bytes"] <= 96 * 1024**2
    assert c["allocated_over_traced"] > 1  # the trace does not see cuBLAS's workspaces
    workspaces = row["estimate"]["allowance"]["workspace_bytes"]
    assert workspaces > 0  # ... the estimate sets them aside, and compares with them in
    assert c["estimated_allocator_bytes"] == c["traced_with_allowance_bytes"] + workspaces
    ratio = c["reserved_peak_bytes"] / c["estimated_allocator_bytes"]
    assert c["reserved_over_estimated"] == pytest.approx(ratio, abs=1e-4)
    assert "(simulated)" in report["env"]["cuda_devices"][0]["name"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| tiny |" in markdown and "(simulated)" in markdown
