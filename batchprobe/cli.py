"""The command line: parse -> call -> render. The only module that prints or exits.

Human output goes to stdout, or to stderr when --json puts the machine-readable result on stdout.
Live progress always goes to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from batchprobe import __version__
from batchprobe.errors import (
    EXIT_BAD_INPUT,
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
    typer.Option(help="auto | cpu | cuda | cuda:N  [spec: probe.device]", show_default=False),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        help="Memory cap: 24GiB, 512MB, bytes or a fraction 0.9 of capacity. On CPU a budget is "
        "always in force (default: half the available RAM).  [spec: probe.memory_budget]",
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
        "pkg.module:factory | file.py:factory  [spec: model.source]",
        show_default=False,
    ),
]
InputOpt = Annotated[
    str | None,
    typer.Option(
        "--input",
        help="Per-sample input shape, e.g. 3x224x224 or 784  [spec: inputs.shape]",
        show_default=False,
    ),
]
SeqLenOpt = Annotated[
    int | None, typer.Option(help="Tokens per sample  [spec: inputs.seq_len]", show_default=False)
]
VocabOpt = Annotated[
    int | None,
    typer.Option(
        help="Vocabulary size for token inputs  [spec: inputs.vocab_size]", show_default=False
    ),
]
ClassesOpt = Annotated[
    int | None,
    typer.Option(
        help="Classes for cross-entropy targets  [spec: inputs.num_classes]", show_default=False
    ),
]
PrecisionOpt = Annotated[
    str | None, typer.Option(help="fp32 | bf16 | fp16  [spec: train.precision]", show_default=False)
]
OptimizerOpt = Annotated[
    str | None,
    typer.Option(
        help="sgd | adam | adamw | none  [spec: train.optimizer.name]", show_default=False
    ),
]
StartOpt = Annotated[
    int | None, typer.Option(help="First batch size tried  [spec: probe.start]", show_default=False)
]
MaxBatchOpt = Annotated[
    int | None,
    typer.Option(help="Never probe above this  [spec: probe.max_batch_size]", show_default=False),
]
StepsOpt = Annotated[
    int | None,
    typer.Option(
        help="Full training steps per probe, at least 2  [spec: probe.steps]", show_default=False
    ),
]
StrategyOpt = Annotated[
    str | None,
    typer.Option(help="auto | doubling | predict  [spec: probe.strategy]", show_default=False),
]


def _flag_values(**flags: Any) -> dict[str, Any]:
    mapping = {
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
    }
    return {mapping[k]: v for k, v in flags.items() if v is not None}


# ----------------------------------------------------------------------------- plumbing


class Out:
    """Where things go: `human` for tables and summaries, `progress` for live updates."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.err = Console(stderr=True, highlight=False)
        self.human = self.err if json_mode else Console(highlight=False)

    def emit_json(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


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


def _write_output(out: Out, path: Path | None, text: str) -> None:
    if path is None:
        return
    from batchprobe.report import write_atomic

    write_atomic(path, text)
    out.err.print(f"[dim]wrote {path}[/dim]")


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
    json_: JsonOpt = False,
    output: OutputOpt = None,
) -> None:
    """Largest micro-batch that completes full training steps (forward, backward, optimizer step): doubling, then bisection to the exact boundary.

    Works from flags alone (--model torchvision:resnet50 --input 3x224x224) or from a YAML spec. Exit codes: 0 found, 2 bad input or a model error, 3 device missing, 4 nothing fits, 130 interrupted (partial results still printed and written).
    """
    out = Out(json_)
    with _handled(out, "find-max"):
        flags = _flag_values(
            device=device,
            memory_budget=memory_budget,
            model=model,
            input_shape=input_shape,
            seq_len=seq_len,
            vocab_size=vocab_size,
            num_classes=num_classes,
            precision=precision,
            optimizer=optimizer,
            start=start,
            max_batch_size=max_batch_size,
            steps=steps,
            strategy=strategy,
        )
        spec = _load_spec(config, set_, flags)
        from batchprobe.probe import open_session

        session = open_session(spec)
        _freeze_heap()
        result = _run_find_max(out, session)
        _finish_find_max(out, session, result, output)


def _run_find_max(out: Out, session: Any) -> Any:
    from batchprobe.report import probe_table

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
        peak = p.peak_bytes
        from batchprobe.units import format_bytes, format_seconds

        note = f"  {p.failure.kind}: {p.failure.message}" if p.failure else ""
        console.print(
            f"probe {len(done):>2}  batch {p.batch_size:>7}  {p.outcome.value:<5}  "
            f"peak {format_bytes(peak):>10}  {format_seconds(p.seconds):>8}{note}",
            markup=False,
        )

    return session.find_max(on_probe=on_probe_line)


def _finish_find_max(out: Out, session: Any, result: Any, output: Path | None) -> None:
    from batchprobe.report import find_max_json, find_max_summary, to_json

    source = session.spec.model.source
    data = find_max_json(result, source)
    text = to_json(data)
    _write_output(out, output, text)
    if out.json_mode:
        out.emit_json(text)
    out.human.print(find_max_summary(result, source))
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


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="batchprobe")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    return None
