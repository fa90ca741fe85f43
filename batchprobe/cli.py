"""The command line: parse -> call -> render. The only module that prints or exits.

Human output goes to stdout, or to stderr when --json puts the machine-readable result on stdout.
Live progress always goes to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from batchprobe import __version__
from batchprobe.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_FITS,
    BatchprobeError,
)

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

# ----------------------------------------------------------------------------- options


def _option(help: str, key: str | None = None, *names: str) -> Any:
    """A Typer option whose help names the spec key it sets."""
    text = f"{help}  \\[spec: {key}]" if key else help
    return typer.Option(*names, help=text, show_default=False)


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML spec (see README for every key).", show_default=False
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a spec key: --set probe.start=8 (repeatable; applied after the flags).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    _option("auto | cpu | cuda | cuda:N", "probe.device"),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        help="Memory cap: 24GiB, 512MB, bytes or a fraction 0.9 of capacity. On CPU a budget is "
        "always in force (default: half the available RAM).  \\[spec: probe.memory_budget]",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Machine-readable result on stdout; human output on stderr.")
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Also write the JSON result to FILE (atomically).",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Model source: zoo:mlp | torchvision:resnet50 | timm:NAME | transformers:gpt2 | "
        "pkg.module:factory | file.py:factory  \\[spec: model.source]",
        show_default=False,
    ),
]
InputOpt = Annotated[
    str | None,
    _option("Per-sample input shape, e.g. 3x224x224 or 784", "inputs.shape", "--input"),
]
SeqLenOpt = Annotated[int | None, _option("Tokens per sample", "inputs.seq_len")]
VocabOpt = Annotated[
    int | None,
    _option("Vocabulary size for token inputs", "inputs.vocab_size"),
]
ClassesOpt = Annotated[
    int | None,
    _option("Classes for cross-entropy targets", "inputs.num_classes"),
]
PrecisionOpt = Annotated[
    str | None,
    _option("fp32 | bf16 | fp16", "train.precision"),
]
OptimizerOpt = Annotated[
    str | None,
    _option("sgd | adam | adamw | none", "train.optimizer.name"),
]
StartOpt = Annotated[
    int | None,
    _option("First batch size tried", "probe.start"),
]
MaxBatchOpt = Annotated[
    int | None,
    _option("Never probe above this", "probe.max_batch_size"),
]
StepsOpt = Annotated[
    int | None,
    _option("Full training steps per probe, at least 2", "probe.steps"),
]
StrategyOpt = Annotated[
    str | None,
    _option("auto | doubling | predict", "probe.strategy"),
]

IsolateOpt = Annotated[
    bool,
    typer.Option(
        "--isolate",
        help="Run each probe in a child process with a timeout: a SIGKILL, a hang or a sticky "
        "device error becomes an outcome  \\[spec: probe.isolate]",
    ),
]


# The spec key each flag sets (a command's own meaning of a name goes in `renames`).
FLAG_KEYS = {
    "device": "probe.device",
    "memory_budget": "probe.memory_budget",
    "model": "model.source",
    "input_shape": "inputs.shape",
    "seq_len": "inputs.seq_len",
    "vocab_size": "inputs.vocab_size",
    "num_classes": "inputs.num_classes",
    "precision": "train.precision",
    "optimizer": "train.optimizer.name",
    "start": "probe.start",
    "max_batch_size": "probe.max_batch_size",
    "steps": "probe.steps",
    "strategy": "probe.strategy",
    "isolate": "probe.isolate",
    "global_batch_size": "plan.global_batch_size",
    "global_tokens": "plan.global_tokens",
    "base_lr": "plan.base_lr",
    "base_batch_size": "plan.base_batch_size",
    "lr_scaling": "plan.lr_scaling",
    "dataset_size": "plan.dataset_size",
    "total_tokens": "plan.total_tokens",
    "epochs": "plan.epochs",
    "num_gpus": "plan.num_gpus",
    "headroom": "plan.headroom",
    "peak_tflops": "plan.peak_tflops",
    "gpu": "estimate.gpu",
    "capacity": "estimate.capacity",
    "fragmentation": "estimate.fragmentation",
    "context": "estimate.context_bytes",
    "tolerance": "check.tolerance",
    "small_batch_size": "noise.small_batch_size",
    "accumulation": "noise.accumulation",
}


def _flag_values(params: Mapping[str, Any], **renames: str) -> dict[str, Any]:
    """Spec values from a command's parameters: the flags that were given (a False switch was
    not), keyed by the spec key they set."""
    keys = {**FLAG_KEYS, **renames}
    return {
        keys[name]: value
        for name, value in params.items()
        if name in keys and value is not None and value is not False
    }


# ----------------------------------------------------------------------------- plumbing


class Out:
    """Where things go: `human` for tables and summaries, `err` for progress and messages, files
    for --output and friends. Under torchrun only rank 0 says or writes anything."""

    def __init__(self, json_mode: bool) -> None:
        import io
        import os

        self.json_mode = json_mode
        self.quiet = (
            int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
            and int(os.environ.get("RANK", "0") or 0) != 0
        )
        if self.quiet:
            self.err = self.human = Console(file=io.StringIO())
        else:
            self.err = Console(stderr=True, highlight=False)
            self.human = self.err if json_mode else Console(highlight=False)

    def emit_json(self, text: str) -> None:
        if not self.quiet:
            sys.stdout.write(text)
            sys.stdout.flush()

    def result(self, data: dict[str, Any], output: Path | None) -> None:
        """The command's JSON result: to --output, and to stdout under --json."""
        from batchprobe.report import to_json

        text = to_json(data)
        self.write(output, text)
        if self.json_mode:
            self.emit_json(text)

    def write(self, path: Path | None, text: str, what: str = "") -> None:
        """Write a file atomically (rank 0 only) and say so."""
        if path is None or self.quiet:
            return
        from batchprobe.report import write_atomic

        write_atomic(path, text)
        self.err.print(f"[dim]wrote {what}{path}[/dim]")


def _fail(out: Out, command: str, exc: BatchprobeError) -> NoReturn:
    if out.json_mode:
        from batchprobe.report import to_json

        out.emit_json(
            to_json(
                {"command": command, "error": {"message": str(exc), "exit_code": exc.exit_code}}
            )
        )
    out.err.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def _handled(out: Out, command: str) -> Iterator[None]:
    try:
        yield
    except BatchprobeError as exc:
        _fail(out, command, exc)
    except KeyboardInterrupt:
        out.err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _load_spec(config: Path | None, sets: list[str] | None, flags: dict[str, Any]) -> Any:
    from batchprobe.errors import Problem, SpecError
    from batchprobe.spec import load_spec

    if (
        config is None
        and "model.source" not in flags
        and not any(s.startswith("model.source=") for s in sets or [])
    ):
        raise SpecError(
            [
                Problem(
                    "model.source",
                    "give --config FILE or --model SOURCE (e.g. --model zoo:mlp)",
                )
            ]
        )
    return load_spec(config, sets or [], values=flags)


def _freeze_heap() -> None:
    """Everything alive once the model is built lives for the whole command: move it out of the
    garbage collector's scans, so the collections after failed probes cost milliseconds."""
    import gc

    gc.collect()
    gc.freeze()


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
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Largest micro-batch that completes full training steps (forward, backward, optimizer step): doubling, then bisection to the exact boundary.

    Works from flags alone (--model torchvision:resnet50 --input 3x224x224) or from a YAML spec. Exit codes: 0 found, 2 bad input or a model error, 3 device missing, 4 nothing fits, 130 interrupted (partial results still printed and written).
    """
    out = Out(json_)
    with _handled(out, "find-max"):
        flags = _flag_values(locals())
        spec = _load_spec(config, set_, flags)
        from batchprobe.session import open_session

        session = open_session(spec)
        _freeze_heap()
        result = _run_find_max(out, session)
        _finish_find_max(out, session, result, output)


def _run_find_max(out: Out, session: Any) -> Any:
    from batchprobe.report import probe_line, probe_table

    limit = session.backend.budget_bytes or session.backend.free_bytes_at_start
    done: list[Any] = []
    console = out.err
    if console.is_terminal:
        live = Live(probe_table([], limit), console=console, refresh_per_second=8, transient=False)

        def on_start(b: int) -> None:
            live.update(probe_table(done, limit, running=b))

        def on_probe(p: Any) -> None:
            done.append(p)
            live.update(probe_table(done, limit))

        with live:
            return session.find_max(on_start=on_start, on_probe=on_probe)

    def on_probe_line(p: Any) -> None:
        done.append(p)
        console.print(probe_line(len(done), p), markup=False, soft_wrap=True)

    return session.find_max(on_probe=on_probe_line)


def _finish_find_max(out: Out, session: Any, result: Any, output: Path | None) -> None:
    from batchprobe.report import find_max_json, find_max_summary

    source = session.spec.model.source
    out.result(find_max_json(result, source), output)
    out.human.print(find_max_summary(result, source))
    _finish_find_max_exit(out, result)


def _finish_find_max_exit(out: Out, result: Any) -> None:
    """Exit codes after a search: 2 on a model error, 130 interrupted, 4 nothing fits."""
    error = result.error
    if error is not None and error.failure is not None:
        out.err.print(
            Text(
                f"The model failed at batch {error.batch_size} with an error that is not about "
                f"memory; fix the model or spec:\n",
                style="bold red",
            )
        )
        out.err.print(
            error.failure.traceback or error.failure.message, markup=False, highlight=False
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.max_batch_size is None:
        raise typer.Exit(EXIT_NOTHING_FITS)


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
        int | None,
        _option("Samples per optimizer step", "plan.global_batch_size"),
    ] = None,
    global_tokens: Annotated[
        int | None,
        _option("Tokens per optimizer step", "plan.global_tokens"),
    ] = None,
    base_lr: Annotated[
        float | None,
        _option("LR known to work at --base-batch-size", "plan.base_lr"),
    ] = None,
    base_batch_size: Annotated[
        int | None,
        _option("Global batch base_lr was tuned at", "plan.base_batch_size"),
    ] = None,
    lr_scaling: Annotated[
        str | None,
        _option("auto | linear | sqrt | none", "plan.lr_scaling"),
    ] = None,
    dataset_size: Annotated[
        int | None,
        _option("Samples per epoch", "plan.dataset_size"),
    ] = None,
    total_tokens: Annotated[
        int | None,
        _option("Tokens in the whole run", "plan.total_tokens"),
    ] = None,
    epochs: Annotated[float | None, _option("Epochs", "plan.epochs")] = None,
    num_gpus: Annotated[
        int | None,
        _option("Data-parallel ranks (default WORLD_SIZE, else 1)", "plan.num_gpus"),
    ] = None,
    headroom: Annotated[
        float | None,
        _option("Keep peak below this fraction of the limit (0.9)", "plan.headroom"),
    ] = None,
    peak_tflops: Annotated[
        float | None,
        _option("Device peak TFLOP/s for MFU", "plan.peak_tflops"),
    ] = None,
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
    with _handled(out, "plan"):
        flags = _flag_values(locals())
        spec = _load_spec(config, set_, flags)
        from batchprobe.session import open_session

        session = open_session(spec)
        _freeze_heap()
        run = _run_plan(out, session)
        _finish_plan(out, session, run, output, csv_file, markdown_file, plot_file)


def _run_plan(out: Out, session: Any) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from batchprobe.report import probe_line, probe_table
    from batchprobe.session import PlanProgress
    from batchprobe.units import format_count, format_seconds

    console = out.err
    limit = session.limit_bytes
    done: list[Any] = []
    live: Live | None = None
    progress: Progress | None = None
    task: Any = None

    def on_probe_start(b: int) -> None:
        if live is not None:
            live.update(probe_table(done, limit, running=b))

    def on_probe(p: Any) -> None:
        done.append(p)
        if live is not None:
            live.update(probe_table(done, limit))
        else:
            console.print(probe_line(len(done), p), markup=False, soft_wrap=True)

    def on_phase(name: str) -> None:
        nonlocal live
        if name == "headroom" and live is not None:
            live.stop()
            live = None

    def on_candidate(b: int, i: int, n: int) -> None:
        nonlocal progress, task
        if live is not None:
            live.stop()
        if console.is_terminal:
            if progress is None:
                progress = Progress(
                    TextColumn("timing micro-batch"),
                    TextColumn("[bold]{task.fields[batch]:>6}"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                )
                progress.start()
                task = progress.add_task("timing", total=n, batch=b)
            progress.update(task, batch=b, completed=i - 1)
        else:
            console.print(f"timing micro-batch {b} ({i}/{n})", markup=False)

    def on_timing(b: int, t: Any) -> None:
        line = (
            f"  micro-batch {b}: fwd+bwd {format_seconds(t.fwd_bwd_s)}, optimizer "
            f"{format_seconds(t.optimizer_s)}, {format_count(b / t.step_s)} samples/s per step"
            + ("  (unstable)" if t.unstable else "")
        )
        if progress is not None:
            progress.console.print(line, markup=False)
        else:
            console.print(line, markup=False)

    callbacks = PlanProgress(on_probe_start, on_probe, on_phase, on_candidate, on_timing)
    if console.is_terminal:
        live = Live(probe_table([], limit), console=console, refresh_per_second=8)
        live.start()
    try:
        return session.plan(callbacks)
    finally:
        if live is not None:
            live.stop()
        if progress is not None:
            progress.stop()


def _finish_plan(
    out: Out,
    session: Any,
    run: Any,
    output: Path | None,
    csv_file: Path | None,
    markdown_file: Path | None,
    plot_file: Path | None,
) -> None:
    from batchprobe.report import (
        find_max_summary,
        plan_chart,
        plan_csv,
        plan_json,
        plan_markdown,
        plan_plot,
        plan_table,
        recommendation_panel,
    )

    source = session.spec.model.source
    out.result(plan_json(run, source), output)
    plan = run.plan
    if plan is not None:
        out.write(csv_file, plan_csv(plan))
        out.write(markdown_file, plan_markdown(plan, run, source))
        if plot_file is not None and not out.quiet:
            plan_plot(plan, plot_file, source)
            out.err.print(f"[dim]wrote {plot_file}[/dim]")
    out.human.print(find_max_summary(run.find_max, source))
    if plan is not None and plan.rows:
        out.human.print(plan_table(plan))
        out.human.print(plan_chart(plan))
        out.human.print(recommendation_panel(plan))
    if run.noise is not None:
        from batchprobe.report import noise_panel

        target = plan.recommended.global_batch_size if plan and plan.recommended else None
        out.human.print(noise_panel(run.noise, source, target))
    for warning in [*run.warnings, *(plan.warnings if plan else ())]:
        out.human.print(Text(f"warning: {warning}", style="yellow"))
    fm = run.find_max
    if fm.error is not None or fm.max_batch_size is None:
        _finish_find_max_exit(out, fm)
    if run.interrupted:
        out.human.print(
            Text("Interrupted: the rows above are what was timed so far.", style="yellow")
        )
        raise typer.Exit(EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------- estimate


@app.command("estimate")
def estimate_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    gpu: Annotated[
        str | None,
        _option(
            "Target GPU from the table: h100-80gb, a100-40gb, l4, rtx-4090, ...", "estimate.gpu"
        ),
    ] = None,
    capacity: Annotated[
        str | None,
        _option("Target capacity, e.g. 80GiB (a GPU)", "estimate.capacity"),
    ] = None,
    fragmentation: Annotated[
        float | None,
        _option("GPU allowance on the peak, default 0.05", "estimate.fragmentation"),
    ] = None,
    context: Annotated[
        str | None,
        _option(
            "GPU fixed allowance (CUDA context, workspaces), default 512MiB",
            "estimate.context_bytes",
            "--context",
        ),
    ] = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    precision: PrecisionOpt = None,
    optimizer: OptimizerOpt = None,
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Memory of full training steps traced with fake tensors (no compute, no device memory), its breakdown, and the largest batch that fits a GPU of a given capacity.

    Without --gpu/--capacity the target is the configured device (on CPU: its budget, and the estimate equals what find-max measures). Where the model cannot be traced, says which op and falls back to real probes.
    """
    out = Out(json_)
    with _handled(out, "estimate"):
        flags = _flag_values(locals())
        spec = _load_spec(config, set_, flags)
        from batchprobe.report import estimate_json, estimate_summary, estimate_table
        from batchprobe.session import run_estimate
        from batchprobe.units import format_bytes

        def on_point(p: Any) -> None:
            out.err.print(
                f"traced batch {p.batch_size:>6}: peak {format_bytes(p.peak_bytes)}", markup=False
            )

        run = run_estimate(spec, on_point=on_point)
        source = spec.model.source
        out.result(estimate_json(run, source), output)
        if run.result is not None:
            out.human.print(estimate_table(run))
        out.human.print(estimate_summary(run, source))
        if run.fallback is not None:
            _finish_find_max_exit(out, run.fallback)
        elif run.result is not None and run.result.max_batch_size is None:
            raise typer.Exit(EXIT_NOTHING_FITS)


# ----------------------------------------------------------------------------- check


@app.command("check")
def check_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    model: ModelOpt = None,
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
    tolerance: Annotated[
        float | None,
        _option("Relative slack on every expectation (default 0.05)", "check.tolerance"),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option(help="Write JUnit XML (one test case per check).", show_default=False),
    ] = None,
    require_gpu: Annotated[
        bool, typer.Option("--require-gpu", help="Exit 3 unless the device is a CUDA GPU.")
    ] = False,
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate", help="Run each probe in a child process  \\[spec: probe.isolate]"
        ),
    ] = False,
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """CI hardware smoke check: fails (exit 1) when max batch, throughput or peak memory regress against the spec's check: section or a baseline.

    Measures only what the expectations need: a max batch of at least N is one probe at N. Appends a Markdown summary to $GITHUB_STEP_SUMMARY when it is set. Exit codes: 0 all hold, 1 a check failed, 2 bad input, 3 device missing (--require-gpu), 130 interrupted.
    """
    out = Out(json_)
    with _handled(out, "check"):
        import json as _json

        from batchprobe.errors import DeviceError, Problem, SpecError

        flags = _flag_values(locals())
        spec = _load_spec(config, set_, flags)
        base = None
        if baseline is not None:
            try:
                base = _json.loads(baseline.read_text())
            except (OSError, ValueError) as exc:
                raise SpecError([Problem("--baseline", f"cannot read {baseline}: {exc}")]) from None
            if not isinstance(base, dict) or base.get("command") != "check-baseline":
                raise SpecError(
                    [
                        Problem(
                            "--baseline",
                            f"{baseline} is not a baseline written by check --update-baseline",
                        )
                    ]
                )
        from batchprobe.check import expectations, run_check
        from batchprobe.session import open_session

        if not expectations(spec, base) and update_baseline is None:
            raise SpecError(
                [
                    Problem(
                        "check",
                        "nothing to check: add a check: section to the spec, or --baseline FILE",
                    )
                ]
            )
        from batchprobe.backends import resolve_device

        if require_gpu and resolve_device(spec.probe.device).type != "cuda":
            raise DeviceError("--require-gpu: no CUDA device is available here")
        session = open_session(spec)
        _freeze_heap()
        run = run_check(
            session,
            base,
            update_baseline=update_baseline is not None,
            on_event=lambda text: out.err.print(f"[dim]{text}[/dim]"),
        )
        _finish_check(out, spec, run, output, junit, update_baseline)


def _finish_check(
    out: Out,
    spec: Any,
    run: Any,
    output: Path | None,
    junit: Path | None,
    update_baseline: Path | None,
) -> None:
    import os

    from batchprobe.report import (
        check_json,
        check_markdown,
        check_table,
        junit_xml,
        to_json,
    )

    source = spec.model.source
    out.result(check_json(run, source), output)
    if junit is not None:
        out.write(junit, junit_xml(run, source))
    if update_baseline is not None and run.baseline is not None and not run.interrupted:
        out.write(update_baseline, to_json(run.baseline), "baseline ")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and not out.quiet:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(check_markdown(run, source))
    if run.outcomes:
        out.human.print(check_table(run))
    verdict = "all checks passed" if run.passed else "a check FAILED"
    out.human.print(Text(verdict, style="bold green" if run.passed else "bold red"))
    if run.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not run.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


# ----------------------------------------------------------------------------- noise-scale


@app.command("noise-scale")
def noise_scale_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    model: ModelOpt = None,
    small_batch_size: Annotated[
        int | None,
        _option("B_small, samples per micro-batch", "noise.small_batch_size"),
    ] = None,
    accumulation: Annotated[
        int | None,
        _option("Micro-batches per big batch", "noise.accumulation"),
    ] = None,
    steps: Annotated[
        int | None,
        _option("Big batches averaged", "noise.steps"),
    ] = None,
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Gradient noise scale (the critical batch size) from real batches: B_simple with its uncertainty, and what it means for the choice of batch size.

    Needs a data: section (real batches); refuses synthetic inputs. Try it with configs/noise-linreg.yaml.
    """
    out = Out(json_)
    with _handled(out, "noise-scale"):
        flags = _flag_values(locals(), steps="noise.steps")
        spec = _load_spec(config, set_, flags)
        from batchprobe.errors import Problem, SpecError
        from batchprobe.report import noise_json, noise_panel
        from batchprobe.session import SYNTHETIC_REFUSAL, open_session, run_noise

        if spec.data is None:
            raise SpecError([Problem("data", SYNTHETIC_REFUSAL)])
        session = open_session(spec)

        def on_step(i: int, stats: Any) -> None:
            if i % 10 == 0 or i == spec.noise.steps:
                b = stats.b_simple()
                out.err.print(f"[dim]{i}/{spec.noise.steps} big batches: B_simple ≈ {b:,.1f}[/dim]")

        run = run_noise(session, on_step)
        out.result(noise_json(run, spec.model.source), output)
        target = spec.plan.global_batch_size
        out.human.print(noise_panel(run, spec.model.source, target))
        if run.stats.stopped == "interrupted":
            raise typer.Exit(EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------- env


@app.command("env")
def env_cmd(json_: JsonOpt = False) -> None:
    """The devices, their memory, torch / CUDA versions, allocator settings, optional packages."""
    from batchprobe.backends import describe_environment
    from batchprobe.report import env_table, to_json
    from batchprobe.units import format_bytes

    out = Out(json_)
    info = describe_environment()
    if json_:
        out.emit_json(to_json({"command": "env", **info}))
    shown = dict(info)
    shown["ram_available_bytes"] = format_bytes(info["ram_available_bytes"])  # type: ignore[arg-type]
    shown["cuda_devices"] = [
        f"cuda:{d['index']} {d['name']}: {format_bytes(d['free_bytes'])} free of "
        f"{format_bytes(d['total_bytes'])}, capability {d['capability']}"
        for d in info["cuda_devices"]  # type: ignore[attr-defined]
    ] or ["none"]
    shown["packages"] = [f"{k} {v or '(not installed)'}" for k, v in info["packages"].items()]  # type: ignore[attr-defined]
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
    pass


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="batchprobe")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
