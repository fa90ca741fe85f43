"""estimate: the traced table with its breakdown, and the summary panel."""

from __future__ import annotations

from rich import box
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from batchprobe.report.format import byte_unit, num
from batchprobe.results import EstimateRun
from batchprobe.search import Outcome
from batchprobe.units import format_bytes, format_seconds


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
            num(b.parameters / div),
            num(b.gradients / div),
            num(b.optimizer_state / div),
            num(b.activations / div),
            num(b.other / div),
            num(p.peak_bytes / div),
            num(p.device_bytes / div),
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
