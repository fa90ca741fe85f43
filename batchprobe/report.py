"""Results -> rich renderables, JSON-able dicts, CSV, Markdown and plots. Never prints.

Rendering is data in, renderable out; `cli.py` decides where it goes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from batchprobe.backends import DeviceInfo
from batchprobe.probe import FindMaxResult, ProbeResult
from batchprobe.search import Outcome
from batchprobe.units import format_bytes, format_seconds

OUTCOME_STYLE = {
    Outcome.FIT: "green",
    Outcome.OOM: "red",
    Outcome.LIMIT: "yellow",
    Outcome.ERROR: "bold red",
}


def percent(part: int | float | None, whole: int | float | None) -> str:
    if part is None or not whole:
        return "-"
    return f"{100.0 * part / whole:.1f}%"


# --------------------------------------------------------------------------- find-max


def probe_table(
    probes: Sequence[ProbeResult], limit_bytes: int | None, running: int | None = None
) -> Table:
    """One row per probe, in the order made; `running` adds a row for the probe under way."""
    table = Table(title="Probes", title_justify="left", expand=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("batch", justify="right")
    table.add_column("outcome")
    table.add_column("peak", justify="right")
    table.add_column("% of limit", justify="right")
    table.add_column("time", justify="right")
    table.add_column("note", overflow="fold", max_width=48)
    for i, p in enumerate(probes, 1):
        note = ""
        if p.failure is not None:
            note = f"{p.failure.kind}: {p.failure.message}"
        elif p.alloc_retries:
            note = f"{p.alloc_retries} allocator retries"
        table.add_row(
            str(i),
            str(p.batch_size),
            Text(p.outcome.value, style=OUTCOME_STYLE[p.outcome]),
            format_bytes(p.peak_bytes)
            if p.outcome is Outcome.FIT
            else f"≥{format_bytes(p.peak_bytes)}"
            if p.peak_bytes
            else "-",
            percent(p.peak_bytes, limit_bytes) if p.outcome is Outcome.FIT else "",
            format_seconds(p.seconds),
            Text(note, style="dim"),
        )
    if running is not None:
        table.add_row(
            str(len(probes) + 1), str(running), Text("running…", style="cyan"), "", "", "", ""
        )
    return table


def limit_label(result: FindMaxResult) -> str:
    if result.budget_bytes is not None:
        return "budget"
    return "free memory"


def find_max_summary(result: FindMaxResult, source: str) -> Panel:
    info = result.device
    best = result.max_batch_size
    lines = Text()
    if best is None:
        if result.interrupted:
            lines.append("Interrupted before any size fit.\n", style="bold yellow")
        elif result.error is not None:
            lines.append(
                "Stopped: the model raised an error (not a memory problem).\n", style="bold red"
            )
        else:
            lines.append("Nothing fits: batch size 1 does not fit.\n", style="bold red")
    else:
        lines.append("Max micro-batch: ", style="bold")
        lines.append(f"{best}", style="bold green")
        if result.search.capped:
            lines.append(
                f"  (cap reached: probe.max_batch_size = {best}; larger sizes not tried)",
                style="yellow",
            )
        elif result.search.exact:
            lines.append(f"  (exact: {best} fits, {best + 1} does not)", style="dim")
        else:
            lines.append("  (not exact: search stopped early)", style="yellow")
        lines.append("\n")
        peak = result.peak_bytes
        lines.append(f"Peak memory at {best}: {format_bytes(peak)}")
        if result.limit_bytes:
            lines.append(
                f"  = {percent(peak, result.limit_bytes)} of the {limit_label(result)} "
                f"({format_bytes(result.limit_bytes)})"
            )
        lines.append(
            f"; {percent(peak, info.capacity_bytes)} of capacity ({format_bytes(info.capacity_bytes)})\n"
        )
    lines.append(f"Model: {source}\n", style="dim")
    lines.append(
        f"Device: {info.device} ({info.name}), torch {info.torch_version}; "
        f"memory measured: {info.details.get('memory', 'allocator')}\n",
        style="dim",
    )
    lines.append(
        f"{len(result.probes)} probes ({result.strategy} search) in {format_seconds(result.seconds)}",
        style="dim",
    )
    if result.interrupted:
        lines.append("\nInterrupted: results so far.", style="yellow")
    parts: list[Any] = [lines]
    for w in result.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    return Panel(Group(*parts), title="find-max", title_align="left", expand=False)


def device_dict(info: DeviceInfo) -> dict[str, Any]:
    return {
        "device": info.device,
        "device_name": info.name,
        "capacity_bytes": info.capacity_bytes,
        "torch_version": info.torch_version,
    }


def find_max_json(result: FindMaxResult, source: str) -> dict[str, Any]:
    """The find-max contract (DESIGN.md), plus a few added keys."""
    error = result.error
    out: dict[str, Any] = {
        "command": "find-max",
        **device_dict(result.device),
        "budget_bytes": result.budget_bytes,
        "limit_bytes": result.limit_bytes,
        "max_batch_size": result.max_batch_size,
        "capped": result.search.capped,
        "exact": result.search.exact,
        "stopped": result.search.stopped,
        "peak_bytes": result.peak_bytes,
        "probes": [p.to_dict() for p in result.probes],
        "seconds": round(result.seconds, 4),
        "strategy": result.strategy,
        "model": source,
        "provenance": "measured",
        "interrupted": result.interrupted,
        "warnings": list(result.warnings),
    }
    if error is not None and error.failure is not None:
        out["error"] = {
            "batch_size": error.batch_size,
            "type": error.failure.error_type,
            "message": error.failure.message,
            "traceback": error.failure.traceback,
        }
    return out


# --------------------------------------------------------------------------- env


def env_table(info: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in info.items():
        if isinstance(value, list):
            value = "\n".join(str(v) for v in value) or "-"
        elif value is None:
            value = "-"
        table.add_row(key, str(value))
    return table


# --------------------------------------------------------------------------- files


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"
