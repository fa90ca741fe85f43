from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchprobe.cli import app
from batchprobe.estimate import Allowance, Tracer
from batchprobe.flows.estimate import run as run_estimate
from batchprobe.gpus import lookup, match_device_name
from batchprobe.probe import run_probe
from batchprobe.sources import build_workload
from batchprobe.spec import load_spec

from helpers import budget_for, session

ROOT = Path(__file__).parent.parent
runner = CliRunner()

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "n_positions": 64}
TINY_BERT = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
}
TINY_LLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
}
MODELS = {
    "zoo-mlp": ("zoo:mlp", {}, 64),
    "zoo-cnn": ("zoo:cnn", {}, 16),
    "zoo-gpt": ("zoo:gpt", {}, 4),
    "zoo-gpt-bf16-checkpointing": ("zoo:gpt", {"train": {"precision": "bf16", "gradient_checkpointing": True}}, 4),
    "torchvision-resnet18": ("torchvision:resnet18", {"inputs": {"shape": [3, 64, 64]}}, 8),
    "transformers-gpt2": ("transformers:gpt2", {"model": {"kwargs": TINY_GPT2}, "inputs": {"seq_len": 32}}, 8),
    "transformers-bert": ("transformers:bert", {"model": {"kwargs": TINY_BERT}, "inputs": {"seq_len": 32}}, 8),
    "transformers-llama": ("transformers:llama", {"model": {"kwargs": TINY_LLAMA}, "inputs": {"seq_len": 32}}, 8),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_peak_matches_the_measured_cpu_peak(name: str) -> None:
    if name == "transformers-bert" and int(version("transformers").split(".")[0]) < 5:
        pytest.skip("transformers < 5's BERT reads a mask's value in forward: not traceable")
    source, sections, batch = MODELS[name]
    s = session(source, budget="8GiB", **sections)
    measured = run_probe(s.step, s.backend, batch)
    traced = Tracer(s.spec, Allowance()).trace(batch)
    assert traced.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    b = traced.breakdown
    params = sum(p.numel() * p.element_size() for p in s.step.parameters())
    assert b.parameters >= params  # parameters (and buffers) are live at the peak
    assert sum(b.as_dict().values()) == traced.peak_bytes


def test_estimate_predicts_the_cpu_boundary_exactly() -> None:
    s = session("zoo:gpt", model={"kwargs": {"n_layer": 2, "n_embd": 64, "vocab_size": 512}})
    budget = budget_for(s, 11)
    spec = load_spec(
        text=json.dumps(
            {
                "model": {
                    "source": "zoo:gpt",
                    "kwargs": {"n_layer": 2, "n_embd": 64, "vocab_size": 512},
                },
                "probe": {"device": "cpu", "memory_budget": budget},
            }
        )
    )
    run = run_estimate(spec)
    assert run.result is not None and run.allowance == Allowance()
    assert run.result.max_batch_size == 11 and run.result.search.exact


@pytest.mark.slow
def test_estimate_strategy_reaches_the_boundary_in_two_real_probes() -> None:
    s = session(
        "zoo:cnn", model={"kwargs": {"width": 8, "depth": 2}}, probe={"strategy": "estimate"}
    )
    from batchprobe.units import MemorySize

    s.backend.set_budget(MemorySize(bytes=budget_for(s, 37)))
    result = s.search()
    assert result.max_batch_size == 37 and result.search.exact
    assert [p.batch_size for p in result.probes] == [37, 38]
    assert result.guess == 37
    doubling = s.search(strategy="doubling")
    assert doubling.max_batch_size == 37 and len(doubling.probes) > 2


def test_gpu_target_applies_the_stated_allowance() -> None:
    spec = load_spec(ROOT / "configs" / "quickstart.yaml", overrides=["estimate.gpu=t4"])
    run = run_estimate(spec)
    assert run.result is not None
    t4 = lookup("t4")
    assert t4 is not None and run.capacity_bytes == t4.capacity_bytes
    a = run.allowance
    assert a.round_to == 512 and a.fragmentation == 0.05 and a.context_bytes == 512 * 1024**2
    best = run.result.point(run.result.max_batch_size)
    above = run.result.point((run.result.max_batch_size or 0) + 1)
    assert best is not None and above is not None
    assert best.device_bytes <= run.result.usable_bytes < above.device_bytes
    assert best.device_bytes == int(best.peak_bytes * 1.05)


def test_gpu_attention_is_traced_without_the_score_matrix() -> None:
    # On the CPU the math kernel materialises T x T scores when dropout is on; a GPU's fused
    # kernels do not: the GPU-target trace must be smaller.
    text = json.dumps(
        {
            "model": {
                "source": "zoo:gpt",
                "kwargs": {"n_layer": 2, "block_size": 256, "dropout": 0.1},
            },
            "inputs": {"seq_len": 256},
        }
    )
    spec = load_spec(text=text)
    cpu = Tracer(spec, Allowance()).trace(4).peak_bytes
    gpu = Tracer(spec, Allowance(flash_attention=True)).trace(4).peak_bytes
    assert gpu < cpu


def test_untraceable_model_names_the_op_and_falls_back_to_probes() -> None:
    spec = load_spec(
        text="model: {source: user_models:opaque}\ninputs: {kind: tensor, shape: [16], num_classes: 4}\n"
        "probe: {device: cpu, memory_budget: 4MiB}"
    )
    run = run_estimate(spec)
    assert run.result is None and run.trace_error is not None
    assert run.trace_error.op == "bptest::opaque_double"
    assert run.fallback is not None and run.fallback.max_batch_size and run.fallback.search.exact


@pytest.mark.slow
def test_estimate_cli_gpt2_small_on_h100(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "estimate",
            "--config",
            str(ROOT / "configs" / "gpt2-small.yaml"),
            "--gpu",
            "h100-80gb",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["command"] == "estimate"
    assert data["capacity_bytes"] == 81089 * 1024**2  # what torch reports (nvidia-smi: 81,559 MiB)
    assert data["max_batch_size"] > 1 and data["exact"]
    for point in data["points"]:
        assert set(point["breakdown"]) == {
            "parameters",
            "gradients",
            "optimizer_state",
            "activations",
            "other",
        }
        assert sum(point["breakdown"].values()) == point["peak_bytes"]
    # parameters of GPT-2 small: 124M fp32 (and the buffers some transformers versions add: a
    # 1024 x 1024 causal mask per layer)
    spec = load_spec(ROOT / "configs" / "gpt2-small.yaml")
    model = build_workload(spec, "meta").model
    params = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert params == pytest.approx(124.4e6 * 4, rel=0.01)
    assert data["points"][0]["breakdown"]["parameters"] == pytest.approx(params + buffers, rel=0.01)
    assert "CUDA context" in result.stderr


def test_estimate_cli_fallback_reports_provenance() -> None:
    result = runner.invoke(
        app,
        ["estimate", "--model", "user_models:opaque", "--set", "inputs={kind: tensor, shape: [16], num_classes: 4}",
         "--device", "cpu", "--memory-budget", "4MiB", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["trace_error"]["op"] == "bptest::opaque_double"
    assert data["provenance"].startswith("measured")
    assert data["max_batch_size"] == data["find_max"]["max_batch_size"]


def test_unknown_gpu_is_bad_input() -> None:
    result = runner.invoke(
        app, ["estimate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--gpu", "h10"]
    )
    assert result.exit_code == 2
    assert "estimate.gpu: unknown GPU 'h10'; did you mean h100-80gb" in result.stderr


@pytest.mark.parametrize(
    ("typed", "key"),
    [
        ("h100", "h100-80gb"),
        ("H100_80GB", "h100-80gb"),
        ("rtx4090", "rtx-4090"),
        ("a100", "a100-80gb"),
    ],
)
def test_gpu_shorthands_resolve(typed: str, key: str) -> None:
    gpu = lookup(typed)
    assert gpu is not None and gpu.key == key


def test_device_names_match_the_table() -> None:
    assert match_device_name("NVIDIA A100-SXM4-80GB").key == "a100-80gb"  # type: ignore[union-attr]
    assert match_device_name("NVIDIA H100 80GB HBM3").key == "h100-80gb"  # type: ignore[union-attr]
    assert match_device_name("NVIDIA L40S").key == "l40s"  # type: ignore[union-attr]
    assert match_device_name("NVIDIA L4").key == "l4"  # type: ignore[union-attr]
    assert match_device_name("Tesla T4").key == "t4"  # type: ignore[union-attr]
    assert match_device_name("Some Future GPU") is None


def test_untraceable_model_for_a_remote_gpu_says_where_to_measure() -> None:
    result = runner.invoke(
        app,
        ["estimate", "--model", "user_models:opaque", "--set", "inputs={kind: tensor, shape: [16], num_classes: 4}",
         "--gpu", "a100-80gb"],
    )  # fmt: skip
    assert result.exit_code == 3
    assert (
        "bptest::opaque_double" in result.stderr
        and "run `batchprobe find-max` on it" in result.stderr
    )


def test_gpu_attention_trace_survives_activation_checkpointing() -> None:
    text = json.dumps(
        {
            # long sequences, small vocabulary: the T x T scores dominate the peak
            "model": {
                "source": "zoo:gpt",
                "kwargs": {
                    "n_layer": 2,
                    "n_head": 8,
                    "block_size": 512,
                    "vocab_size": 256,
                    "dropout": 0.1,
                },
            },
            "inputs": {"seq_len": 512},
            "train": {"gradient_checkpointing": True},
        }
    )
    spec = load_spec(text=text)
    cpu = Tracer(spec, Allowance()).trace(4).peak_bytes
    gpu = Tracer(spec, Allowance(flash_attention=True)).trace(4).peak_bytes
    assert gpu < cpu


LSTM = ["--model", "zoo:lstm", "--set", "model.kwargs={hidden: 128, embed: 64}", "--set", "inputs.seq_len=64"]  # fmt: skip


@pytest.mark.slow
def test_estimate_on_this_device_checks_the_trace_with_one_probe() -> None:
    """The target is the device here: one real probe at the estimated max says whether the trace
    holds. An LSTM's oneDNN workspace is invisible to the trace: the probe fails and says which
    op; --no-verify leaves the device alone."""
    args = ["estimate", *LSTM, "--device", "cpu", "--memory-budget", "96MiB", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    check, probe = data["trace_check"], data["verify_probe"]
    assert probe["batch_size"] == check["batch_size"] == data["max_batch_size"]
    assert probe["outcome"] == "oom" and check["ratio"] > 2 and "rnn" in check["op"]
    human = runner.invoke(app, args[:-1])
    assert "does not fit" in human.stdout and "under-counted" in human.stdout
    skipped = json.loads(runner.invoke(app, [*args, "--no-verify"]).stdout)
    assert "trace_check" not in skipped and "verify_probe" not in skipped
    # where the trace is right, the probe fits and says so
    quick = ["estimate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--device", "cpu"]
    agreed = json.loads(runner.invoke(app, [*quick, "--json"]).stdout)
    assert (
        agreed["verify_probe"]["outcome"] == "fit"
        and abs(agreed["trace_check"]["ratio"] - 1) < 0.02
    )
    # it opened the device: what a training run needs there is said, as find-max says it
    assert agreed["training_environment"] == {} and agreed["capacity_source"]


PRIMED = [
    ({"model": {"source": "zoo:mlp", "kwargs": {"hidden": 256}}}, 64),
    ({"model": {"source": "zoo:cnn"}}, 16),
    ({"model": {"source": "zoo:gpt", "kwargs": {"n_layer": 2, "n_embd": 64, "n_head": 2}},
      "train": {"gradient_checkpointing": True}}, 8),
    ({"model": {"source": "zoo:lstm", "kwargs": {"hidden": 64, "embed": 32}}}, 8),
    ({"model": {"source": "zoo:encoder", "kwargs": {"n_layer": 2, "d_model": 64}}}, 8),
    ({"model": {"source": "zoo:mlp", "kwargs": {"hidden": 256}},
      "train": {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}}, 64),
    ({"model": {"source": "zoo:gpt", "kwargs": {"n_layer": 2, "n_embd": 64, "n_head": 2}},
      "train": {"precision": "bf16", "optimizer": {"name": "adam", "lr": 1e-3}}}, 8),
    ({"model": {"source": "transformers:gpt2", "kwargs": TINY_GPT2}, "inputs": {"seq_len": 32},
      "train": {"precision": "fp16"}}, 4),
    ({"model": {"source": "user_models:unused_head"},
      "inputs": {"kind": "tensor", "shape": [16], "num_classes": 4}}, 32),
]  # fmt: skip


@pytest.mark.parametrize("data, batch_size", PRIMED)
def test_a_primed_trace_has_the_peaks_of_two_steps(data: dict, batch_size: int) -> None:
    """The prior's traces make the optimizer's state first and trace one step (a third less
    work): the peak, the forward/backward peak and the optimizer step's are those of the two
    steps a probe runs, to the byte — a head the forward never uses included (primed with
    gradients for every parameter, it took 1 MiB of optimizer state no step makes)."""
    spec = load_spec(text=json.dumps({**data, "probe": {"device": "cpu"}}))
    full = Tracer(spec, Allowance(), spec.probe.steps).trace(batch_size)
    tracer = Tracer(spec, Allowance(), spec.probe.steps)
    tracer.trace(1)  # a traced step says which parameters get gradients (a prior's first trace)
    primed = tracer.trace(batch_size, primed=True)
    assert batch_size not in tracer._points  # traced primed indeed
    assert primed.peak_bytes == full.peak_bytes
    for phase in ("forward", "backward", "optimizer"):
        assert primed.phase_peaks.get(phase) == full.phase_peaks.get(phase), phase


def test_the_estimate_table_cuts_no_value_at_80_columns() -> None:
    """A T4 target in GiB gave 0.00249 and 0.00000381-wide cells: at 80 columns rich cut
    them ("0.01…", "% c…"). Small values read "<0.01"; the JSON keeps every byte."""
    from rich.console import Console

    from batchprobe.report.estimate import estimate_table

    spec = load_spec(ROOT / "configs" / "quickstart.yaml", overrides=["estimate.gpu=t4"])
    run = run_estimate(spec)
    console = Console(width=80, record=True, color_system=None)
    console.print(estimate_table(run))
    text = console.export_text()
    assert "…" not in text, text
    assert "<0.01" in text and "% cap" in text
