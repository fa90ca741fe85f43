"""The Typer commands: parse -> call a flow -> render. Only the CLI prints, writes files or exits.

Torch is imported when a command runs (through the flows), not for `--help`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from batchprobe import __version__
from batchprobe.cli import finish
from batchprobe.cli.options import (
    BudgetOpt,
    ClassesOpt,
    ConfigOpt,
    DeviceOpt,
    InputOpt,
    IsolateOpt,
    JsonOpt,
    MaxBatchOpt,
    ModelOpt,
    OptimizerOpt,
    OutputOpt,
    PlotOpt,
    PrecisionOpt,
    SeqLenOpt,
    SetOpt,
    StartOpt,
    StepsOpt,
    StrategyOpt,
    SweepOpt,
    TopOpt,
    VocabOpt,
    WhatIfOpt,
    flag_values,
    spec_flag,
    sweep_set,
)
from batchprobe.cli.output import Out, handled
from batchprobe.cli.progress import LiveProgress
from batchprobe.errors import (
    EXIT_INTERRUPTED,
    DeviceError,
    Problem,
    SpecError,
)
from batchprobe.report import json as contract
from batchprobe.report import noise as noise_view
from batchprobe.report.env import env_table
from batchprobe.report.peak import DEFAULT_TOP
from batchprobe.spec import Spec, load_spec
from batchprobe.units import format_bytes

if TYPE_CHECKING:
    from batchprobe.session import Session

app = typer.Typer(
    name="batchprobe",
    help=(
        "Find the largest micro-batch that trains on your device, how fast each size runs, "
        "and the accumulation, learning rate and wall-clock that follow."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _spec(
    config: Path | None, sets: list[str] | None, flags: dict[str, Any], command: str = "find-max"
) -> Spec:
    if (
        config is None
        and "model.source" not in flags
        and not any(s.startswith("model.source=") for s in sets or [])
    ):
        raise SpecError(
            [Problem("model.source", "give --config FILE or --model SOURCE (e.g. --model zoo:mlp)")]
        )
    spec = load_spec(config, sets or [], values=flags)
    if spec.probe.axis != "batch_size" and command != "find-max":
        raise SpecError(
            [Problem("probe.axis", f"seq_len is find-max's axis; {command} works on batch sizes")]
        )
    return spec


def _session(spec: Spec) -> Session:
    """Open the session, then move everything alive out of the garbage collector's scans: it
    lives for the whole command, and the collections after failed probes then cost milliseconds."""
    import gc

    from batchprobe.session import open_session

    session = open_session(spec)
    gc.collect()
    gc.freeze()
    return session


# ----------------------------------------------------------------------------- find-max


@app.command("find-max")
def find_max_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    model: ModelOpt = None,
    input_shape: InputOpt = None,
    seq_len: SeqLenOpt = None,
    vocab_size: VocabOpt = None,
    num_classes: ClassesOpt = None,
    precision: PrecisionOpt = None,
    optimizer: OptimizerOpt = None,
    start: StartOpt = None,
    max_batch_size: MaxBatchOpt = None,
    steps: StepsOpt = None,
    strategy: StrategyOpt = None,
    isolate: IsolateOpt = False,
    axis: Annotated[str | None, spec_flag("axis", "--axis")] = None,
    batch_size: Annotated[int | None, spec_flag("batch_size", "--batch-size")] = None,
    top: TopOpt = DEFAULT_TOP,
    plot_file: PlotOpt = None,
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Largest micro-batch that completes full training steps (forward, backward, optimizer step), exact: max fits, max + 1 was tried and did not. Then what fills the peak there, by module and tensor.

    The search starts from the fake-tensor trace and learns from every probe (--strategy). --axis seq_len --batch-size N finds the longest sequence at micro-batch N instead. Works from flags alone (--model torchvision:resnet50 --input 3x224x224) or from a YAML spec. Exit codes: 0 found, 2 bad input or a model error, 3 device missing, 4 nothing fits, 130 interrupted (partial results still printed and written).
    """
    out = Out(json_)
    with handled(out, "find-max", output):
        from batchprobe.flows import find_max

        spec = _spec(config, set_, flag_values(locals()))
        session = _session(spec)
        size = "seq_len" if spec.probe.axis == "seq_len" else "batch"
        with LiveProgress(out.err, session.limit_bytes, size=size) as progress:
            result = find_max.run(session, progress, timeline=plot_file is not None)
        finish.find_max(out, spec, result, output, top, plot_file)


# ----------------------------------------------------------------------------- plan


@app.command("plan")
def plan_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    model: ModelOpt = None,
    input_shape: InputOpt = None,
    seq_len: SeqLenOpt = None,
    vocab_size: VocabOpt = None,
    num_classes: ClassesOpt = None,
    precision: PrecisionOpt = None,
    optimizer: OptimizerOpt = None,
    start: StartOpt = None,
    max_batch_size: MaxBatchOpt = None,
    steps: StepsOpt = None,
    strategy: StrategyOpt = None,
    global_batch_size: Annotated[
        int | None, spec_flag("global_batch_size", "--global-batch-size")
    ] = None,
    global_tokens: Annotated[int | None, spec_flag("global_tokens", "--global-tokens")] = None,
    base_lr: Annotated[float | None, spec_flag("base_lr", "--base-lr")] = None,
    base_batch_size: Annotated[
        int | None, spec_flag("base_batch_size", "--base-batch-size")
    ] = None,
    lr_scaling: Annotated[str | None, spec_flag("lr_scaling", "--lr-scaling")] = None,
    dataset_size: Annotated[int | None, spec_flag("dataset_size", "--dataset-size")] = None,
    total_tokens: Annotated[int | None, spec_flag("total_tokens", "--total-tokens")] = None,
    epochs: Annotated[float | None, spec_flag("epochs", "--epochs")] = None,
    num_gpus: Annotated[int | None, spec_flag("num_gpus", "--num-gpus")] = None,
    headroom: Annotated[float | None, spec_flag("headroom", "--headroom")] = None,
    peak_tflops: Annotated[float | None, spec_flag("peak_tflops", "--peak-tflops")] = None,
    what_if: WhatIfOpt = False,
    top: TopOpt = DEFAULT_TOP,
    json_: JsonOpt = False,
    output: OutputOpt = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Write the rows as CSV.", show_default=False)
    ] = None,
    markdown_file: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown report.", show_default=False)
    ] = None,
    plot_file: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG chart (needs matplotlib).", show_default=False),
    ] = None,
) -> None:
    """find-max, then timed passes at several micro-batches: memory, throughput, accumulation, scaled LR and projected wall-clock per micro-batch, and a recommendation.

    Candidates are the powers of two up to the max, the max itself, and the largest size whose peak stays within the headroom (or plan.candidates). Exit codes as find-max; 130 on Ctrl-C with the rows timed so far.
    """
    out = Out(json_)
    with handled(out, "plan", output):
        from batchprobe.flows import plan

        spec = _spec(config, set_, flag_values(locals()), "plan")
        session = _session(spec)
        with LiveProgress(out.err, session.limit_bytes) as progress:
            run = plan.run(session, progress)
        finish.plan(out, spec, run, output, csv_file, markdown_file, plot_file, top)


# ----------------------------------------------------------------------------- estimate


@app.command("estimate")
def estimate_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    gpu: Annotated[
        str | None,
        spec_flag(
            "gpu",
            "--gpu",
            help="Target GPU from the table: h100-80gb, a100-40gb, l4, rtx-4090, ...",
        ),
    ] = None,
    capacity: Annotated[str | None, spec_flag("capacity", "--capacity")] = None,
    fragmentation: Annotated[float | None, spec_flag("fragmentation", "--fragmentation")] = None,
    context: Annotated[str | None, spec_flag("context", "--context")] = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    input_shape: InputOpt = None,
    seq_len: SeqLenOpt = None,
    vocab_size: VocabOpt = None,
    num_classes: ClassesOpt = None,
    precision: PrecisionOpt = None,
    optimizer: OptimizerOpt = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Without --gpu/--capacity, skip the one real probe at the estimated max that "
            "checks the trace on this device.  \\[spec: estimate.verify]",
        ),
    ] = False,
    what_if: WhatIfOpt = False,
    sweep: SweepOpt = None,
    top: TopOpt = DEFAULT_TOP,
    plot_file: PlotOpt = None,
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Memory of full training steps traced with fake tensors (no compute, no device memory), its breakdown, and the largest batch that fits a GPU of a given capacity.

    Without --gpu/--capacity the target is the configured device (on CPU: its budget, and the estimate equals what find-max measures), and one real probe at the estimated max checks the trace there (--no-verify skips it). --what-if adds the max under each change that applies; --sweep seq_len=... the max at each sequence length. Where the model cannot be traced, says which op and falls back to real probes.
    """
    out = Out(json_)
    with handled(out, "estimate", output):
        from batchprobe.flows import estimate

        sets = [*(set_ or []), *(["estimate.verify=false"] if no_verify else [])]
        sets += [sweep_set(sweep)] if sweep is not None else []
        spec = _spec(config, sets, flag_values(locals()), "estimate")
        with LiveProgress(out.err, None) as progress:
            run = estimate.run(spec, progress, timeline=plot_file is not None)
        finish.estimate(out, spec, run, output, top, plot_file)


# ----------------------------------------------------------------------------- check


@app.command("check")
def check_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    model: ModelOpt = None,
    input_shape: InputOpt = None,
    seq_len: SeqLenOpt = None,
    vocab_size: VocabOpt = None,
    num_classes: ClassesOpt = None,
    precision: PrecisionOpt = None,
    optimizer: OptimizerOpt = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="Compare with a baseline written earlier by --update-baseline.", show_default=False
        ),
    ] = None,
    update_baseline: Annotated[
        Path | None,
        typer.Option(
            help="Measure the max batch, throughput and peak memory and write them as a baseline.",
            show_default=False,
        ),
    ] = None,
    tolerance: Annotated[float | None, spec_flag("tolerance", "--tolerance")] = None,
    junit: Annotated[
        Path | None,
        typer.Option(help="Write JUnit XML (one test case per check).", show_default=False),
    ] = None,
    require_gpu: Annotated[
        bool,
        typer.Option("--require-gpu", help="Exit 3 unless the device is an accelerator (a GPU)."),
    ] = False,
    isolate: Annotated[
        bool, spec_flag("isolate", "--isolate", help="Run each probe in a child process")
    ] = False,
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """CI hardware smoke check: fails (exit 1) when max batch, throughput or peak memory regress against the spec's check: section or a baseline.

    Measures only what the expectations need: a max batch of at least N is one probe at N. A throughput drop fails beyond the tolerance plus the timing's measured noise; timed while other processes held the CPUs (cpu_wait above 20%), it is not judged: 'unsure'. Appends a Markdown summary to $GITHUB_STEP_SUMMARY when it is set. Exit codes: 0 all hold, 1 a check failed, 2 bad input, 3 device missing (--require-gpu), 130 interrupted.
    """
    out = Out(json_)
    with handled(out, "check", output):
        from batchprobe.backends import is_accelerator
        from batchprobe.flows import check

        spec = _spec(config, set_, flag_values(locals()), "check")
        base = finish.read_baseline(baseline) if baseline is not None else None
        if not check.expectations(spec, base) and update_baseline is None:
            raise SpecError(
                [
                    Problem(
                        "check",
                        "nothing to check: add a check: section to the spec, or --baseline FILE",
                    )
                ]
            )
        if require_gpu and not is_accelerator(spec.probe.device):
            raise DeviceError("--require-gpu: no GPU is available here")
        session = _session(spec)
        with LiveProgress(out.err, session.limit_bytes) as progress:
            run = check.run(session, base, update_baseline is not None, progress)
        finish.check(out, spec, run, output, junit, update_baseline)


# ----------------------------------------------------------------------------- noise-scale


@app.command("noise-scale")
def noise_scale_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    model: ModelOpt = None,
    small_batch_size: Annotated[
        int | None, spec_flag("small_batch_size", "--small-batch-size")
    ] = None,
    accumulation: Annotated[int | None, spec_flag("accumulation", "--accumulation")] = None,
    noise_steps: Annotated[int | None, spec_flag("noise_steps", "--steps")] = None,
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Gradient noise scale (the critical batch size) from real batches: B_simple with its uncertainty, and what it means for the choice of batch size.

    Needs a data: section (real batches); refuses synthetic inputs. Try it with configs/noise-linreg.yaml.
    """
    out = Out(json_)
    with handled(out, "noise-scale", output):
        from batchprobe.flows import noise

        spec = _spec(config, set_, flag_values(locals()), "noise-scale")
        if spec.data is None:
            raise SpecError([Problem("data", noise.SYNTHETIC_REFUSAL)])
        session = _session(spec)
        with LiveProgress(out.err, None, noise_steps=spec.noise.steps) as progress:
            run = noise.run(session, progress)
        out.result(contract.noise_json(run, spec.model.source), output)
        target = spec.plan.global_batch_size
        out.human.print(noise_view.noise_panel(run, spec.model.source, target))
        if run.stats.stopped == "interrupted":
            raise typer.Exit(EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------- env


@app.command("env")
def env_cmd(json_: JsonOpt = False) -> None:
    """The devices, their memory, torch / CUDA versions, allocator settings, optional packages."""
    from batchprobe.backends import describe_environment

    out = Out(json_)
    info = describe_environment()
    if json_:
        out.emit_json(contract.to_json({"command": "env", **info}))
    shown: dict[str, Any] = dict(info)
    shown["ram_available_bytes"] = format_bytes(info["ram_available_bytes"])  # type: ignore[arg-type]
    devices: list[dict[str, Any]] = info.get("cuda_devices", [])  # type: ignore[assignment]
    shown["cuda_devices"] = [
        f"cuda:{d['index']} {d['name']}: {format_bytes(d['free_bytes'])} free of "
        f"{format_bytes(d['total_bytes'])}, capability {d['capability']}"
        for d in devices
    ] or ["none"]
    packages: dict[str, str | None] = info["packages"]  # type: ignore[assignment]
    shown["packages"] = [f"{k} {v or '(not installed)'}" for k, v in packages.items()]
    out.human.print(env_table(shown))


def _version_callback(value: bool) -> None:
    if value:
        print(f"batchprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    from batchprobe.backends.hostmem import before_torch

    before_torch()  # torch is imported by the command, after this


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="batchprobe")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
