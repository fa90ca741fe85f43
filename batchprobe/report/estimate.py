"""estimate: the traced table with its breakdown, and the summary panel."""

from __future__ import annotations

from rich import box
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from batchprobe.report.format import bar, byte_unit, num
from batchprobe.results import EstimateRun, SweepPoint, WhatIf
from batchprobe.search import Outcome
from batchprobe.units import format_bytes, format_count, format_seconds


def _cell(x: float) -> str:
    """A size in the table's unit, short enough that no cell is cut: under 0.01 of the unit
    reads "<0.01" (the JSON has the bytes)."""
    if x == 0:
        return "0"
    if x < 0.005:
        return "<0.01"
    return f"{x:.2f}" if x < 1 else num(x)


def estimate_table(run: EstimateRun) -> Table:
    """Traced peak and its breakdown at every traced batch size."""
    result = run.result
    assert result is not None
    points = result.points
    unit, div = byte_unit([p.device_bytes for p in points])
    table = Table(
        title=f"Traced training steps (fake tensors), {unit}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    for name in ("batch", "param", "grad", "optim", "activ", "other", "peak", "device", "% cap"):
        table.add_column(name, justify="right", no_wrap=True)
    best = result.max_batch_size
    for p in points:
        b = p.breakdown
        style = (
            "bold green"
            if p.batch_size == best
            else ("dim" if p.device_bytes > result.usable_bytes else "")
        )
        table.add_row(
            ("★ " if p.batch_size == best else "") + str(p.batch_size),
            _cell(b.parameters / div),
            _cell(b.gradients / div),
            _cell(b.optimizer_state / div),
            _cell(b.activations / div),
            _cell(b.other / div),
            _cell(p.peak_bytes / div),
            _cell(p.device_bytes / div),
            f"{100 * (p.device_bytes + result.capacity_bytes - result.usable_bytes) / result.capacity_bytes:.0f}%",
            style=style,
        )
    table.caption = (
        "live at the peak: parameters, gradients, optimizer state, activations, other; "
        "device: the peak with the allowance; % cap: of capacity, fixed allowance included"
    )
    table.caption_justify = "left"
    return table


def estimate_summary(run: EstimateRun, source: str) -> Panel:
    text = Text()
    result = run.result
    if result is None:
        err = run.trace_error
        text.append("Could not trace the model with fake tensors", style="bold yellow")
        text.append(f" (op: {err.op})" if err is not None and err.op else "")
        text.append(f"\n{err}\n" if err is not None else "\n", style="dim")
        fm = run.fallback
        if fm is not None:
            text.append("Fell back to real probes on ", style="bold")
            text.append(f"{fm.device.device} ({fm.device.name}): max micro-batch ")
            text.append(f"{fm.max_batch_size}", style="bold green")
            text.append(" (measured)\n")
        return Panel(text, title="estimate", title_align="left", expand=False)
    best = result.max_batch_size
    text.append(f"Target: {run.target}, capacity {format_bytes(result.capacity_bytes)}\n")
    text.append("Estimated max micro-batch: ", style="bold")
    if best is None:
        text.append("none — batch 1 does not fit", style="bold red")
    else:
        text.append(str(best), style="bold green")
        if result.search.capped:
            text.append(f" (cap reached: probe.max_batch_size = {best})", style="yellow")
        elif result.search.exact:
            text.append(f"  (traced: {best} fits, {best + 1} does not)", style="dim")
    text.append("\n")
    probe = run.verify_probe
    if probe is not None:
        fits = probe.outcome is Outcome.FIT
        text.append("Checked with one real probe: ", style="bold")
        text.append(
            f"{best} {'fits' if fits else 'does not fit'}",
            style="green" if fits else "bold red",
        )
        if run.verified is not None:
            text.append(f"; {run.verified.describe()}")
        if not fits:
            text.append(" — run find-max for the measured answer")
        text.append("\n")
    text.append(f"Allowance for what the trace cannot see: {result.allowance.describe()}\n")
    if result.allowance.context_bytes or result.allowance.fragmentation:
        text.append(
            "The trace counts every tensor PyTorch allocates. A real GPU also holds the CUDA "
            "context and library workspaces (cuBLAS, cuDNN, NCCL), rounds blocks and fragments: "
            "tune estimate.fragmentation / estimate.context_bytes, and confirm with find-max on "
            "the card.\n",
            style="dim",
        )
    text.append(
        f"Model: {source}, {result.num_parameters / 1e6:,.1f}M parameters; {len(result.points)} traces "
        f"in {format_seconds(result.seconds)}; provenance: estimated (fake-tensor trace, no compute)",
        style="dim",
    )
    return Panel(text, title="estimate", title_align="left", expand=False)


def what_if_table(rows: list[WhatIf]) -> Table:
    """The estimated max micro-batch and peak under each change, largest first, with the
    `--set` that makes it and what else it changes."""
    base = next((r for r in rows if r.effect == "spec"), None)
    table = Table(
        title="What if (traced; paste a change as --set '...')",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    table.add_column("change", overflow="fold")
    table.add_column("max", justify="right", no_wrap=True)
    table.add_column("vs spec", justify="right", no_wrap=True)
    table.add_column("peak", justify="right", no_wrap=True)
    table.add_column("effect", overflow="fold")
    for r in rows:
        ratio = ""
        if base is not None and base.max_batch_size and r.max_batch_size and r is not base:
            ratio = f"{r.max_batch_size / base.max_batch_size:.2f}x"
        table.add_row(
            r.change,
            str(r.max_batch_size) if r.max_batch_size is not None else "-",
            ratio,
            format_bytes(r.peak_bytes) if r.peak_bytes is not None else "",
            r.error if r.error else r.effect_text,
            style="bold" if r.effect == "spec" else ("dim" if r.error else ""),
        )
    return table


def sweep_chart(points: list[SweepPoint], width: int = 30) -> Table:
    """Max micro-batch (and tokens per micro-batch) against the sequence length, as bars."""
    top = max((p.max_batch_size or 0 for p in points), default=0)
    table = Table(
        title="Max micro-batch by sequence length (traced)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    table.add_column("seq_len", justify="right")
    table.add_column("max micro-batch", no_wrap=True)
    table.add_column("tokens/micro-batch", justify="right")
    table.add_column("peak", justify="right")
    for p in points:
        if p.max_batch_size is None:
            table.add_row(str(p.seq_len), Text(p.error or "nothing fits", style="dim"), "", "")
            continue
        table.add_row(
            str(p.seq_len),
            Text(bar(p.max_batch_size, top, width).ljust(width) + f" {p.max_batch_size}", "cyan"),
            format_count(p.tokens or 0),
            format_bytes(p.peak_bytes),
        )
    return table
