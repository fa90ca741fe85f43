"""The command-line flags: each spec-backed flag names its key, and its help is that key's own
documentation in the spec (one source). `flag_values` turns a command's parameters into spec
values."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from batchprobe.spec import key_doc

# The spec key each flag (a command's parameter name) sets.
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
    "axis": "probe.axis",
    "batch_size": "probe.batch_size",
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
    "what_if": "estimate.what_if",
    "small_batch_size": "noise.small_batch_size",
    "accumulation": "noise.accumulation",
    "noise_steps": "noise.steps",
}


def spec_flag(param: str, *names: str, help: str | None = None) -> Any:
    """A Typer option for the flag `param`: its help is the spec key's documentation (or
    `help`), followed by the key it sets."""
    key = FLAG_KEYS[param]
    text = help or key_doc(key)
    text = text[:1].upper() + text[1:]
    return typer.Option(*names, help=f"{text}  \\[spec: {key}]", show_default=False)


def flag_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """Spec values from a command's parameters: the flags that were given (a False switch was
    not), keyed by the spec key they set."""
    return {
        FLAG_KEYS[name]: value
        for name, value in params.items()
        if name in FLAG_KEYS and value is not None and value is not False
    }


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
DeviceOpt = Annotated[str | None, spec_flag("device", "--device")]
BudgetOpt = Annotated[
    str | None,
    spec_flag(
        "memory_budget",
        "--memory-budget",
        help="Memory cap: 24GiB, 512MB, bytes or a fraction 0.9 of capacity. On CPU a budget is "
        "always in force (default: half the available RAM).",
    ),
]
ModelOpt = Annotated[str | None, spec_flag("model", "--model")]
InputOpt = Annotated[
    str | None,
    spec_flag("input_shape", "--input", help="Per-sample input shape, e.g. 3x224x224 or 784"),
]
SeqLenOpt = Annotated[int | None, spec_flag("seq_len", "--seq-len")]
VocabOpt = Annotated[int | None, spec_flag("vocab_size", "--vocab-size")]
ClassesOpt = Annotated[int | None, spec_flag("num_classes", "--num-classes")]
PrecisionOpt = Annotated[str | None, spec_flag("precision", "--precision")]
OptimizerOpt = Annotated[str | None, spec_flag("optimizer", "--optimizer")]
StartOpt = Annotated[int | None, spec_flag("start", "--start")]
MaxBatchOpt = Annotated[int | None, spec_flag("max_batch_size", "--max-batch-size")]
StepsOpt = Annotated[int | None, spec_flag("steps", "--steps")]
StrategyOpt = Annotated[str | None, spec_flag("strategy", "--strategy")]
IsolateOpt = Annotated[
    bool,
    spec_flag(
        "isolate",
        "--isolate",
        help="Run each probe in a child process with a timeout: a SIGKILL, a hang or a sticky "
        "device error becomes an outcome",
    ),
]
TopOpt = Annotated[
    int,
    typer.Option(
        "--top",
        min=0,
        help="Rows of the peak's explanation: the largest modules and tensors (JSON: "
        "peak_breakdown.top_tensors); 0 prints only its one-line reading.",
    ),
]
WhatIfOpt = Annotated[bool, spec_flag("what_if", "--what-if")]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write a PNG (needs matplotlib): the memory timeline of the traced steps at the max, "
        "by kind and phase; estimate --sweep: max micro-batch against seq_len.",
        show_default=False,
    ),
]
SweepOpt = Annotated[
    str | None,
    typer.Option(
        "--sweep",
        help="seq_len=256,512,1024: the estimated max micro-batch (and tokens per micro-batch) at "
        "each sequence length.  \\[spec: estimate.sweep_seq_len]",
        show_default=False,
    ),
]


def sweep_set(text: str) -> str:
    """--sweep seq_len=256,512 as the --set it stands for; a SpecError naming --sweep else."""
    from batchprobe.errors import Problem, SpecError

    axis, _, values = text.partition("=")
    try:
        lengths = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        lengths = []
    if axis.strip() != "seq_len" or not lengths or min(lengths) < 1:
        raise SpecError(
            [Problem("--sweep", f"expected seq_len=N,N,... (positive integers), got {text!r}")]
        )
    return f"estimate.sweep_seq_len=[{', '.join(map(str, lengths))}]"
