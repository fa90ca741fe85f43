"""What fills the peak: every live storage at the peak, by the module that made it, and the
largest tensors — measured by the CPU's ledger, traced for a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchprobe.backends.simcuda import simulated_cuda
from batchprobe.cli import app
from batchprobe.probe import _run_steps, run_probe
from batchprobe.results import PeakBreakdown, TensorAtPeak
from batchprobe.search import Outcome

from helpers import session

ROOT = Path(__file__).parent.parent
runner = CliRunner()
GPT = {"kwargs": {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "block_size": 32}}


def test_the_measured_peak_is_explained_to_the_byte_by_module() -> None:
    s = session("zoo:gpt", "512MiB", model=GPT)
    probe = run_probe(s.step, s.device, 16)
    assert probe.outcome is Outcome.FIT and probe.peak_bytes
    e = probe.explained
    assert e is not None and e.source == "measured" and e.batch_size == 16
    assert e.peak_bytes == probe.peak_bytes == sum(m.bytes for m in e.by_module)
    assert all(m.bytes == sum(m.by_kind.values()) for m in e.by_module)
    sizes = [t.bytes for t in e.top_tensors]
    assert sizes == sorted(sizes, reverse=True)
    # every parameter is counted once, under the module that holds it
    model = s.step.model
    names = {n or type(model).__name__ for n, _ in model.named_modules()}
    params = sum(m.by_kind.get("parameters", 0) for m in e.by_module)
    assert params == sum(p.numel() * p.element_size() for p in set(model.parameters()))
    owners = {
        m.module for m in e.by_module if "parameters" in m.by_kind or "gradients" in m.by_kind
    }
    assert owners <= names, owners - names
    # the largest activations of a GPT block are the MLP's
    assert any(t.module.endswith("mlp.0") and t.kind == "activations" for t in e.top_tensors)


@pytest.mark.parametrize(
    "train", [{}, {"precision": "bf16", "gradient_checkpointing": True}], ids=["plain", "ckpt"]
)
def test_explaining_the_peak_does_not_change_it(train: dict[str, object]) -> None:
    # nothing is hooked on tensors: a checkpoint's recomputed graph is freed as without it
    s = session("zoo:gpt", "512MiB", model=GPT, train=train)
    explained = run_probe(s.step, s.device, 8)
    step = s.step
    with s.device.track(step.persistent_tensors()) as meter:  # no model: nothing explained
        step.observer = meter
        _run_steps(step, 8, 2, dry_run=False)
    step.observer = None
    step.end()
    assert explained.explained is not None and meter.figures.explained is None
    assert explained.peak_bytes == meter.figures.peak_bytes


def test_the_loss_is_named_and_its_logits_lead_the_reading() -> None:
    # vocabulary 512 x 32 tokens: the loss's fp32 log-softmax and its gradients are the peak
    s = session("zoo:gpt", "512MiB", model=GPT)
    e = run_probe(s.step, s.device, 32).explained
    assert e is not None
    top = e.top_tensors[0]
    assert top.shape == (32 * 32, 512) and top.module == "(loss)"
    assert "logits in the loss" in e.reading and "[1024, 512]" in e.reading


def test_the_reading_finds_one_tensor_in_several_dtypes_or_else_the_largest_module() -> None:
    def t(nbytes: int, shape: tuple[int, ...], dtype: str, op: str, module: str) -> TensorAtPeak:
        return TensorAtPeak(nbytes, shape, dtype, op, module, "activations")

    family = [
        t(400, (10, 10), "float32", "mm", "head"),
        t(200, (100,), "bfloat16", "_to_copy", "head"),
        t(100, (5, 5), "float32", "relu", "body"),
    ]
    e = PeakBreakdown.of(family, 4, "traced")
    assert e.reading.startswith("86% of the peak is 2 tensors of [10, 10]")
    assert "float32, bfloat16" in e.reading and "mm, _to_copy" in e.reading
    spread = [t(10, (i + 1,), "float32", "relu", f"layer{i % 3}") for i in range(30)]
    e = PeakBreakdown.of(spread, 4, "measured")
    assert e.reading.startswith("33% of the peak is layer")
    assert PeakBreakdown.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_find_max_json_explains_the_peak_at_the_max() -> None:
    result = runner.invoke(
        app, ["find-max", "--config", str(ROOT / "configs/quickstart.yaml"), "--top", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    e = data["peak_breakdown"]
    assert e["batch_size"] == data["max_batch_size"] and e["source"] == "measured"
    assert e["peak_bytes"] == data["peak_bytes"] == sum(m["bytes"] for m in e["by_module"])
    assert len(e["top_tensors"]) == 3
    assert set(e["top_tensors"][0]) == {"bytes", "shape", "dtype", "op", "module", "kind"}


def test_on_a_gpu_the_peak_is_explained_from_a_trace_at_the_max() -> None:
    # the allocator sees blocks, not tensors: the explanation is the trace's at that size
    with simulated_cuda(total_bytes=256 * 1024**2, context_bytes=16 * 1024**2):
        s = session("zoo:gpt", "160MiB", model=GPT, probe={"device": "cuda"})
        result = s.search()
    e = result.explained
    assert result.max_batch_size is not None and e is not None
    assert e.source == "traced" and e.batch_size == result.max_batch_size
    assert e.peak_bytes == sum(m.bytes for m in e.by_module)


@pytest.mark.slow
def test_gpt2_at_1024_tokens_is_mostly_its_logits_in_the_loss() -> None:
    pytest.importorskip("transformers")
    result = runner.invoke(
        app, ["estimate", "--model", "transformers:gpt2", "--gpu", "h100-80gb", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    e = data["peak_breakdown"]
    assert e["batch_size"] == data["max_batch_size"]
    point = next(p for p in data["points"] if p["batch_size"] == data["max_batch_size"])
    total = sum(m["bytes"] for m in e["by_module"])
    assert abs(total - point["peak_bytes"]) <= 0.01 * point["peak_bytes"]
    top = e["top_tensors"][0]
    assert top["shape"][-1] == 50257 and top["dtype"] == "float32"
    b = data["max_batch_size"]
    assert top["shape"][0] in (b * 1023, b * 1024)  # every token's logits (shifted, or padded)
    assert "logits in the loss" in e["reading"] and "50257]" in e["reading"]


@pytest.mark.slow
def test_what_if_lists_the_changes_and_find_max_confirms_them_on_the_cpu() -> None:
    from batchprobe.flows import estimate as estimate_flow
    from batchprobe.flows.what_if import AS_SPECIFIED, with_change
    from batchprobe.session import open_session
    from batchprobe.spec import load_spec

    spec = load_spec(
        ROOT / "configs/quickstart.yaml", ["probe.device=cpu", "estimate.verify=false"]
    )
    spec = with_change(spec, "estimate.what_if=true")
    rows = {r.change: r for r in estimate_flow.run(spec).what_if or []}
    base = rows[AS_SPECIFIED].max_batch_size
    wanted = (
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        "train.optimizer={name: sgd, lr: 0.0003}",
        "train.optimizer=none",
    )
    assert set(wanted) <= set(rows), list(rows)
    assert rows["train.precision=bf16"].effect == "numerics"
    assert rows["train.gradient_checkpointing=true"].effect == "none"
    for change in wanted:
        row = rows[change]
        assert row.error is None and row.max_batch_size is not None and base is not None
        measured = open_session(with_change(spec, change)).search()
        assert measured.search.exact, change
        assert measured.max_batch_size == row.max_batch_size, change
    # each of them lets more through than the spec itself, checkpointing most of all
    assert all(rows[c].max_batch_size > base for c in wanted)  # type: ignore[operator]
    ckpt = rows["train.gradient_checkpointing=true"].max_batch_size
    assert ckpt == max(rows[c].max_batch_size or 0 for c in wanted)


@pytest.mark.slow
def test_what_if_json_is_sorted_with_the_spec_s_own_row() -> None:
    args = ["estimate", "--model", "zoo:mlp", "--device", "cpu", "--memory-budget", "64MiB",
            "--what-if", "--no-verify", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["what_if"]
    assert [r["max_batch_size"] for r in rows] == sorted(
        (r["max_batch_size"] for r in rows), reverse=True
    )
    own = next(r for r in rows if r["change"] == "(as specified)")
    assert own["max_batch_size"] == data["max_batch_size"]
    assert {"train.precision=bf16", "train.optimizer=none"} <= {r["change"] for r in rows}
    assert all(
        set(r) >= {"change", "max_batch_size", "peak_bytes", "changes_numerics"} for r in rows
    )


def test_a_sweep_over_seq_len_gives_the_max_at_each_length() -> None:
    args = ["estimate", "--config", str(ROOT / "configs/quickstart.yaml"), "--no-verify",
            "--sweep", "seq_len=16,32,64,128", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    sweep = data["sweep"]
    assert sweep["axis"] == "seq_len"
    points = {p["seq_len"]: p for p in sweep["points"]}
    assert list(points) == [16, 32, 64, 128]
    assert points[64]["max_batch_size"] == data["max_batch_size"]  # the spec's own seq_len
    sizes = [points[n]["max_batch_size"] for n in (16, 32, 64)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert all(
        points[n]["tokens_per_micro_batch"] == n * points[n]["max_batch_size"] for n in (16, 32, 64)
    )
    assert points[128]["max_batch_size"] is None and "64 positions" in points[128]["error"]


@pytest.mark.parametrize("text", ["batch=1,2", "seq_len=", "seq_len=a,b", "seq_len=0"])
def test_a_sweep_that_cannot_be_read_is_named(text: str) -> None:
    result = runner.invoke(app, ["estimate", "--model", "zoo:gpt", "--sweep", text])
    assert result.exit_code == 2 and "--sweep" in result.output, result.output


def test_plot_draws_the_memory_timeline_of_the_steps_at_the_max(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    args = ["find-max", "--config", str(ROOT / "configs/quickstart.yaml"), "--plot", str(png)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_timeline_peaks_where_the_trace_does() -> None:
    from batchprobe.estimate import Tracer
    from batchprobe.results import Allowance
    from batchprobe.spec import load_spec

    tracer = Tracer(load_spec(ROOT / "configs/quickstart.yaml"), Allowance())
    timeline = tracer.timeline(8)
    phases = [phase for phase, _ in timeline]
    assert {"forward", "backward", "optimizer"} <= set(phases)
    # after each op: never above the peak, and within the largest op's output of it
    top = max(sum(by.values()) for _, by in timeline)
    point = tracer.trace(8)
    assert top <= point.peak_bytes
    assert top >= point.peak_bytes - max(t.bytes for t in point.explained.top_tensors)  # type: ignore[union-attr]
    # optimizer state appears in the first optimizer phase and stays
    first_opt = phases.index("optimizer")
    assert not any(by.get("optimizer_state") for _, by in timeline[:first_opt])
    assert timeline[-1][1].get("optimizer_state", 0) > 0
