from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchprobe.cli import app

runner = CliRunner()
ROOT = Path(__file__).parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
FIND_MAX_KEYS = {
    "command", "device", "device_name", "capacity_bytes", "budget_bytes", "max_batch_size",
    "capped", "probes", "seconds",
}  # fmt: skip
PROBE_KEYS = {"batch_size", "outcome", "peak_bytes", "seconds"}


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.slow
def test_find_max_quickstart_json_contract_and_exact_boundary() -> None:
    result = run(
        "find-max", "--config", QUICKSTART, "--device", "cpu", "--memory-budget", "1GiB", "--json"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # stdout is nothing but the JSON
    assert set(data) >= FIND_MAX_KEYS
    assert data["command"] == "find-max"
    assert data["budget_bytes"] == 1024**3
    best = data["max_batch_size"]
    outcomes = {p["batch_size"]: p["outcome"] for p in data["probes"]}
    for p in data["probes"]:
        assert set(p) >= PROBE_KEYS
    assert outcomes[best] == "fit"
    assert outcomes[best + 1] == "oom"
    assert data["exact"] and not data["capped"]
    assert data["peak_bytes"] <= data["budget_bytes"]
    assert "Max micro-batch" in result.stderr  # the human summary went to stderr
    # what set the capacity, as the summary names it (the JSON did not say)
    assert data["capacity_source"] and data["capacity_source"] in result.stderr


def test_find_max_from_flags_alone_with_output_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "result.json"
    result = run(
        "find-max",
        "--model",
        "user_models:tiny_mlp",
        "--input",
        "16",
        "--num-classes",
        "4",
        "--device",
        "cpu",
        "--memory-budget",
        "8MiB",
        "--optimizer",
        "sgd",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["max_batch_size"] > 1
    assert "Max micro-batch" in result.stdout
    assert not list(out.parent.glob(".result.json.*"))  # no temporary left behind


def test_cap_is_reported() -> None:
    result = run(
        "find-max", "--model", "zoo:mlp", "--device", "cpu", "--max-batch-size", "12", "--json"
    )
    data = json.loads(result.stdout)
    assert result.exit_code == 0
    assert data["max_batch_size"] == 12 and data["capped"]
    assert max(p["batch_size"] for p in data["probes"]) == 12


def test_nothing_fits_exits_4() -> None:
    result = run(
        "find-max", "--model", "zoo:mlp", "--device", "cpu", "--memory-budget", "1MiB", "--json"
    )
    assert result.exit_code == 4
    data = json.loads(result.stdout)
    assert data["max_batch_size"] is None
    assert data["probes"][-1]["batch_size"] == 1
    assert "Nothing fits" in result.stderr
    # the trace said so too: its failure at batch 1 is no sign of a lower limit, nor an
    # "estimate 0"
    said = " ".join(result.stderr.replace("│", " ").split())
    assert "lower than the one told" not in said and "estimate 0" not in said, said
    assert "the fake-tensor trace: nothing fits" in said, said
    assert "Capacity " in said and "budget 1.00 MiB" in said  # what it did not fit in


def test_missing_device_exits_3() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = run("find-max", "--model", "zoo:mlp", "--device", "cuda")
    assert result.exit_code == 3
    assert "no CUDA device is available" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "zoo:mlpp"], "did you mean 'zoo:mlp'"),
        (["--model", "torchvision:resnet5O"], "torchvision has no model 'resnet5O'"),
        (["--model", "no_such_pkg.models:net"], "cannot import module 'no_such_pkg.models'"),
        (["--model", "user_models:nope"], "has no attribute 'nope'"),
        (["--model", "user_models:not_a_module"], "returned int, not a torch.nn.Module"),
        (["--model", "missing/file.py:net"], "file not found: missing/file.py"),
        (
            ["--model", "zoo:mlp", "--set", "model.kwargs={colour: red}"],
            "does not accept these kwargs",
        ),
        (["--model", "transformers:not-a-model-type"], "neither a model type nor a hub id"),
        (["--model", "zoo:mlp", "--precision", "fp8"], "train.precision: must be one of"),
        (["--model", "zoo:mlp", "--memory-budget", "12 parsecs"], "unknown unit 'parsecs'"),
        (["--model", "zoo:mlp", "--set", "loss=hinge"], "unknown loss 'hinge'"),
        ([], "give --config FILE or --model SOURCE"),
        (
            ["--model", "torchvision:resnet18", "--set", "train.gradient_checkpointing=true"],
            "offers no switch",
        ),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(args: list[str], message: str) -> None:
    result = run("find-max", "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_input_in_json_mode_is_json_too() -> None:
    result = run("find-max", "--model", "zoo:nope", "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["error"]["exit_code"] == 2 and "zoo" in data["error"]["message"]


def test_spec_file_errors_name_the_line(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("model: {source: zoo:mlp}\nprobe:\n  start: 0\n  memory_budget: 3 bananas\n")
    result = run("find-max", "--config", str(spec))
    assert result.exit_code == 2
    assert "line 3: probe.start: must be at least 1" in result.stderr
    assert "line 4: probe.memory_budget" in result.stderr


def test_model_error_exits_2_with_its_traceback() -> None:
    result = run(
        "find-max",
        "--model",
        "user_models:broken",
        "--input",
        "16",
        "--num-classes",
        "4",
        "--device",
        "cpu",
        "--strategy",
        "doubling",
    )
    assert result.exit_code == 2
    assert "not about memory" in result.stderr
    assert "mat1 and mat2" in result.stderr


def test_missing_optional_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    result = run("find-max", "--model", "timm:resnet18", "--device", "cpu")
    assert result.exit_code == 2
    assert "pip install 'timm'" in result.stderr


def test_ctrl_c_prints_and_writes_partial_results_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "partial.json"
    result = run(
        "find-max",
        "--model",
        "user_models:interrupting",
        "--input",
        "16",
        "--num-classes",
        "4",
        "--device",
        "cpu",
        "--strategy",
        "doubling",
        "--json",
        "--output",
        str(out),
    )
    assert result.exit_code == 130
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    assert data["max_batch_size"] == 8  # 1, 2, 4, 8 fit; Ctrl-C during 16
    assert [p["batch_size"] for p in data["probes"]] == [1, 2, 4, 8]
    assert json.loads(result.stdout) == data
    assert "Interrupted" in result.stderr


def test_env_json() -> None:
    result = run("env", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["command"] == "env"
    assert "torch" in data and isinstance(data["cuda_devices"], list)


def _find_max_under(limit: int) -> subprocess.CompletedProcess[str]:
    """`batchprobe find-max --model zoo:mlp --json` in a process whose address space is capped."""
    import resource

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "batchprobe", "find-max", "--model", "zoo:mlp", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=capped,
    )


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_no_room_for_torch_under_an_rlimit_is_said_without_a_traceback() -> None:
    """`prlimit --as 2.5G batchprobe find-max ...` with a CUDA build of torch: loading its
    libraries alone maps ~3.1 GiB, and the import failed with a traceback. Now: exit 3 (the
    environment), one message naming the limit."""
    import resource

    if resource.getrlimit(resource.RLIMIT_AS)[1] != resource.RLIM_INFINITY:
        pytest.skip("this process runs under a hard address-space limit")
    probe = "import batchprobe.cli; print(open('/proc/self/status').read())"
    status = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    vm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if "VmSize" in line)
    done = _find_max_under(vm + 96 * 1024**2)  # the CLI itself fits; torch's libraries do not
    assert done.returncode == 3, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "RLIMIT_AS" in done.stderr and "before anything was measured" in done.stderr
    assert json.loads(done.stdout)["error"]["exit_code"] == 3


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchprobe", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.startswith("batchprobe ")


def test_help_lists_every_flag() -> None:
    result = run("find-max", "--help")
    for flag in [
        "--config",
        "--set",
        "--device",
        "--memory-budget",
        "--model",
        "--input",
        "--seq-len",
        "--vocab-size",
        "--precision",
        "--optimizer",
        "--json",
        "--output",
    ]:
        assert flag in result.stdout


def test_help_names_the_spec_key_each_flag_sets() -> None:
    result = run("find-max", "--help")
    text = " ".join(result.stdout.replace("│", " ").split())  # undo the help's wrapping
    assert "[spec: probe.memory_budget]" in text
    assert "[spec: inputs.seq_len]" in text


def test_a_budget_above_what_the_device_can_take_is_refused() -> None:
    result = runner.invoke(
        app, ["find-max", "--model", "zoo:mlp", "--device", "cpu", "--memory-budget", "900TiB"]
    )
    assert result.exit_code == 2, result.output
    assert (
        "probe.memory_budget" in result.stderr and "more than this device can take" in result.stderr
    )
    assert "Traceback" not in result.output


def test_a_flag_the_model_does_not_read_is_an_error() -> None:
    result = runner.invoke(
        app,
        [
            "find-max",
            "--model",
            "zoo:mlp",
            "--seq-len",
            "64",
            "--device",
            "cpu",
            "--memory-budget",
            "64MiB",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "inputs.seq_len: does not apply: zoo:mlp takes tensor inputs" in result.stderr


@pytest.mark.parametrize("command", ["find-max", "plan", "estimate", "check"])
def test_every_command_that_builds_a_model_takes_the_same_model_flags(command: str) -> None:
    text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
    for flag in (
        "--model",
        "--input",
        "--seq-len",
        "--vocab-size",
        "--num-classes",
        "--precision",
        "--optimizer",
        "--device",
        "--memory-budget",
    ):
        assert flag in text, (command, flag)


def test_estimate_reads_the_input_flag() -> None:
    args = [
        "estimate",
        "--model",
        "zoo:cnn",
        "--input",
        "3x16x16",
        "--device",
        "cpu",
        "--memory-budget",
        "64MiB",
        "--no-verify",
        "--json",
    ]
    small = json.loads(runner.invoke(app, args).stdout)
    args[4] = "3x32x32"
    large = json.loads(runner.invoke(app, args).stdout)
    assert small["max_batch_size"] > 2 * large["max_batch_size"]


@pytest.mark.parametrize(
    ("model", "strategy"),
    [
        ("user_models:ctrl_c_while_building", "doubling"),
        ("user_models:ctrl_c_when_traced", "estimate"),
    ],
)
@pytest.mark.parametrize("command", ["find-max", "plan"])
def test_ctrl_c_before_the_first_probe_still_writes_the_output(
    tmp_path: Path, model: str, strategy: str, command: str
) -> None:
    # seen: Ctrl-C in the first seconds (building the model, tracing) wrote no --output
    out = tmp_path / "partial.json"
    result = run(
        command, "--model", model, "--input", "16", "--num-classes", "4", "--device", "cpu",
        "--memory-budget", "64MiB", "--strategy", strategy, "--json", "--output", str(out),
    )  # fmt: skip
    assert result.exit_code == 130, result.stderr
    data = json.loads(out.read_text())
    assert data["command"] == command and data["interrupted"] is True
    assert data["max_batch_size"] is None
    assert json.loads(result.stdout) == data


def test_ctrl_c_in_the_headroom_search_says_nothing_false(tmp_path: Path) -> None:
    # seen: "no micro-batch keeps peak memory within headroom" and "the rows above" with no rows
    common = ["--model", "user_models:ctrl_c_off_powers_of_two", "--input", "16", "--num-classes",
              "4", "--device", "cpu", "--memory-budget", "64MiB", "--strategy", "doubling",
              "--max-batch-size", "64"]  # fmt: skip
    probes = json.loads(run("find-max", *common, "--json").stdout)["probes"]
    peaks = {p["batch_size"]: p["peak_bytes"] for p in probes}
    headroom = (peaks[32] + peaks[64]) / 2 / (64 * 1024**2)  # 64 is above it, 32 within
    out = tmp_path / "plan.json"
    result = run("plan", *common, "--set", f"plan.headroom={headroom:.6f}", "--output", str(out))
    assert result.exit_code == 130, result.stderr
    data = json.loads(out.read_text())
    assert data["interrupted"] is True and data["rows"] == [] and data["max_batch_size"] == 64
    text = result.stdout + result.stderr
    assert "headroom" not in " ".join(data["warnings"])
    assert "no micro-batch keeps" not in text and "rows above" not in text
    assert "Interrupted before any micro-batch was timed" in text


def test_a_shape_error_is_told_once_with_an_unbroken_traceback() -> None:
    # seen: 18 lines of torch's fake-tensor log before batchprobe's message, and a traceback
    # broken at 80 columns in the middle of file paths
    fixtures = str(Path(__file__).parent / "fixtures")
    result = subprocess.run(
        [sys.executable, "-m", "batchprobe", "find-max", "--model", "user_models:shape_bug",
         "--input", "16", "--num-classes", "4", "--device", "cpu", "--memory-budget", "64MiB"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "80", "PYTHONPATH": fixtures},
    )  # fmt: skip
    assert result.returncode == 2
    err, both = result.stderr, result.stdout + result.stderr
    assert "fake_tensor.py" not in both and "failed while attempting to run meta" not in both
    assert "could not trace the model" in both  # said once, in batchprobe's words
    frames = [line for line in err.splitlines() if line.strip().startswith('File "')]
    assert frames and all('", line ' in line for line in frames)  # each frame on one line
    assert any("module.py" in line and len(line) > 80 for line in frames)


@pytest.mark.parametrize(
    "kwargs",
    [
        "model.kwargs={d_model: 30, n_head: 4}",  # the constructor asserts
        "model.kwargs={hidden: -4}",  # torch refuses a negative size
    ],
)
def test_a_model_that_fails_to_build_is_bad_input_naming_the_key(kwargs: str) -> None:
    """A constructor that raises (an AssertionError, a RuntimeError) is the spec's kwargs at
    fault: exit 2 naming `model.kwargs`, not a traceback and exit 1."""
    model = "zoo:encoder" if "d_model" in kwargs else "zoo:mlp"
    result = run("find-max", "--model", model, "--set", kwargs, "--device", "cpu", "--json")
    assert result.exit_code == 2, result.output
    assert "model.kwargs" in result.stderr
    assert json.loads(result.stdout)["error"]["exit_code"] == 2


def test_the_timing_line_agrees_with_its_parts() -> None:
    """The line said samples/s from a quartile of the step totals, beside a fwd+bwd and an
    optimizer time whose sum (what the table and the JSON's step_time_s use) said another."""
    from rich.console import Console

    from batchprobe.cli.progress import LiveProgress
    from batchprobe.results import StepTiming

    console = Console(width=120, record=True, color_system=None)
    timing = StepTiming(96, 1.21, 0.073, step_s=1.587, spread=0.01, warmup_steps=1, timed_steps=5)
    with LiveProgress(console, None) as progress:
        progress.timed(96, timing)
    line = console.export_text()
    assert "74.8 samples/s" in line, line


@pytest.mark.parametrize("capacity", ["1.5", "1000"])
def test_a_capacity_that_cannot_be_meant_names_its_key(capacity: str) -> None:
    """`estimate --capacity 1.5` was read as 2 bytes, then refused without naming the key."""
    result = run("estimate", "--model", "zoo:mlp", "--capacity", capacity, "--json")
    assert result.exit_code == 2, result.output
    assert "estimate.capacity" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_just_too_little_room_for_torch_is_exit_3_at_every_limit() -> None:
    """Just below what loading torch maps, its native libraries ended the process themselves —
    OpenBLAS's "Memory allocation still failed after 10 retries" (exit 1), C++'s bad_alloc
    (exit 134) — before Python could say anything. Loading is tried first in a child with
    this process's room: exit 3 and the limit named, at every limit in that window."""
    import resource

    if resource.getrlimit(resource.RLIMIT_AS)[1] != resource.RLIM_INFINITY:
        pytest.skip("this process runs under a hard address-space limit")
    probe = (
        "import batchprobe.cli\n"
        "def vm(): return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status')"
        " if l.startswith('VmSize'))\n"
        "before = vm(); import torch; print(before, vm())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    _, loaded = (int(x) for x in out.stdout.split())
    for below in (16, 64, 112, 160, 256):
        done = _find_max_under(loaded - below * 1024**2)
        assert done.returncode == 3, (below, done.returncode, done.stderr[-600:])
        assert "Traceback" not in done.stderr and "RLIMIT_AS" in done.stderr
        assert json.loads(done.stdout)["error"]["exit_code"] == 3
