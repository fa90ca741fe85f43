"""find-max: the live probe table, one log line per probe, the summary panel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from batchprobe.report.format import OUTCOME_STYLE, percent, plural
from batchprobe.results import FindMaxResult, ProbeResult
from batchprobe.search import Outcome
from batchprobe.units import format_bytes, format_seconds


def training_environment_note(limit: str | None, environment: dict[str, str]) -> str:
    """What a training run must set for the figures to hold under a limit on the process's own
    mappings (an rlimit): the allocator setting every step here ran with."""
    which = (limit or "an rlimit").split(" less ")[0]
    settings = " ".join(f"{k}={v}" for k, v in environment.items())
    return (
        f"{which} counts mappings, not tensors: every step here unmapped the blocks it "
        f"freed. Train with {settings} for these figures to hold; with glibc's defaults freed "
        "blocks stay mapped and less fits."
    )


def probe_table(
    probes: Sequence[ProbeResult],
    limit_bytes: int | None,
    running: int | None = None,
    size: str = "batch",
) -> Table:
    """One row per probe, in the order made; `running` adds a row for the probe under way.
    `size` heads the sizes' column (seq_len along that axis)."""
    table = Table(title="Probes", title_justify="left", expand=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column(size, justify="right")
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
        fit = p.outcome is Outcome.FIT
        # a failed probe's peak is where it stopped: at least that much was needed
        peak = (
            format_bytes(p.peak_bytes)
            if fit or not p.peak_bytes
            else f"≥{format_bytes(p.peak_bytes)}"
        )
        table.add_row(
            str(i),
            str(p.batch_size),
            Text(p.outcome.value, style=OUTCOME_STYLE[p.outcome]),
            peak,
            percent(p.peak_bytes, limit_bytes) if fit else "",
            format_seconds(p.seconds),
            Text(note, style="dim"),
        )
    if running is not None:
        table.add_row(
            str(len(probes) + 1), str(running), Text("running…", style="cyan"), "", "", "", ""
        )
    return table


def probe_line(index: int, p: ProbeResult, size: str = "batch") -> str:
    """One probe as a log line, for terminals without live display (CI logs)."""
    note = f"  {p.failure.kind}: {p.failure.message}" if p.failure else ""
    if p.reused:
        note += "  (from an earlier probe's peak)"
    return (
        f"probe {index:>2}  {size} {p.batch_size:>7}  {p.outcome.value:<5}  "
        f"peak {format_bytes(p.peak_bytes):>10}  {format_seconds(p.seconds):>8}{note}"
    )


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
        elif result.axis == "seq_len":
            lines.append(
                f"Nothing fits: seq_len 1 at micro-batch {result.held_batch_size} does not fit.\n",
                style="bold red",
            )
        else:
            lines.append("Nothing fits: batch size 1 does not fit.\n", style="bold red")
        if not result.interrupted and result.error is None:
            set_by = info.details.get("capacity")
            lines.append(
                f"Capacity {format_bytes(info.capacity_bytes)}"
                f"{f', set by {set_by}' if set_by else ''}"
                f"{f'; {limit_label(result)} {format_bytes(result.limit_bytes)}' if result.limit_bytes else ''}\n"
            )
    else:
        along = result.axis == "seq_len"
        what = (
            f"Max seq_len at micro-batch {result.held_batch_size}" if along else "Max micro-batch"
        )
        lines.append(f"{what}: ", style="bold")
        lines.append(f"{best}", style="bold green")
        if result.search.capped:
            cap = "the model's maximum positions or probe.max_batch_size" if along else (
                "probe.max_batch_size"
            )  # fmt: skip
            lines.append(f"  (cap reached: {cap} = {best}; larger sizes not tried)", style="yellow")
        elif result.search.exact:
            lines.append(f"  (exact: {best} fits, {best + 1} does not)", style="dim")
        else:
            lines.append("  (not exact: search stopped early)", style="yellow")
        lines.append("\n")
        peak = result.peak_bytes
        at = f"seq_len {best}" if along else f"{best}"
        lines.append(f"Peak memory at {at}: {format_bytes(peak)}")
        if result.limit_bytes:
            lines.append(
                f"  = {percent(peak, result.limit_bytes)} of the {limit_label(result)} "
                f"({format_bytes(result.limit_bytes)})"
            )
        set_by = info.details.get("capacity")
        lines.append(
            f"; {percent(peak, info.capacity_bytes)} of capacity "
            f"({format_bytes(info.capacity_bytes)}{f', set by {set_by}' if set_by else ''})\n"
        )
    lines.append(f"Model: {source}\n", style="dim")
    lines.append(
        f"Device: {info.device} ({info.name}), torch {info.torch_version}; "
        f"memory measured: {info.details.get('memory', 'allocator')}\n",
        style="dim",
    )
    environment = info.details.get("training_environment") or {}
    if environment:
        inherited = info.details.get("training_environment_inherited", False)
        lines.append(training_environment_note(info.details.get("capacity"), environment) + "\n",
                     style="dim" if inherited else "yellow")  # fmt: skip
    started = (
        ""
        if result.guess is None
        else ", the fake-tensor trace: nothing fits"
        if result.guess == 0
        else f", from the fake-tensor estimate {result.guess}"
    )
    ran = sum(1 for p in result.probes if not p.reused)
    reused = len(result.probes) - ran
    earlier = f" + {reused} answered by steps already measured" if reused else ""
    traced = (
        f" (tracing {format_seconds(result.trace_seconds)})" if result.trace_seconds >= 0.05 else ""
    )
    lines.append(
        f"{plural(ran, 'probe')}{earlier} ({result.strategy} search{started}) in "
        f"{format_seconds(result.seconds)}{traced}",
        style="dim",
    )
    if result.trace_check is not None:
        check = result.trace_check
        size = "seq_len" if result.axis == "seq_len" else "batch"
        lines.append("\n" + check.describe(size), style="dim" if check.agreed else "yellow")
    if result.interrupted:
        lines.append("\nInterrupted: results so far.", style="yellow")
    parts: list[Any] = [lines]
    for w in result.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    return Panel(Group(*parts), title="find-max", title_align="left", expand=False)
