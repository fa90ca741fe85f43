"""plan: the table, the chart, the recommendation panel, CSV, Markdown and the PNG chart."""

from __future__ import annotations

import csv
import io

from rich import box
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from batchprobe.planning import UNSTABLE_SPREAD, Plan, Row
from batchprobe.report.format import bar, byte_unit, lr_column, num, percent, time_unit
from batchprobe.report.json import PLAN_COLUMNS
from batchprobe.report.plots import png, pyplot
from batchprobe.results import PlanRun
from batchprobe.spec import OPTIMIZER_CLASSES
from batchprobe.units import format_bytes, format_count, format_seconds

#: columns dropped, in this order, when the table is wider than the terminal (the figures stay
#: in --json and --csv); a value is never cut
DROP_ORDER = ("optim", "tokens\n/s", "%\nlimit", "warm-up\nsteps", "fwd+bwd", "MFU", "peak")


def plan_table(plan: Plan, width: int | None = None, threads: int | None = None) -> Table:
    """One row per candidate micro-batch; units in the headers; ★ marks the recommendation,
    dim rows are not eligible (the caption says why), ~ marks an unstable timing. With
    `width`, columns are dropped (DROP_ORDER) until the table fits."""
    rows = plan.rows
    mem_unit, mem_div = byte_unit([r.peak_bytes for r in rows])
    step_unit, step_div = time_unit(
        [r.fwd_bwd_time_s for r in rows] + [r.optimizer_time_s for r in rows]
    )
    run_unit, run_div = time_unit([r.projected_seconds for r in rows])
    chosen = plan.recommended.micro_batch_size if plan.recommended else None
    lrs = lr_column([r.lr for r in rows])
    columns: list[tuple[str, list[str]]] = [
        ("micro", [("★ " if r.micro_batch_size == chosen else "") + str(r.micro_batch_size) for r in rows]),
        ("accum", [str(r.grad_accum_steps) for r in rows]),
        ("global", [f"{r.global_batch_size}" + ("" if r.divides_exactly else "*") for r in rows]),
        (f"peak\n{mem_unit}", [num(r.peak_bytes / mem_div if r.peak_bytes is not None else None) for r in rows]),
        ("%\nlimit", [f"{100 * r.peak_fraction:.0f}%" if r.peak_fraction is not None else "-" for r in rows]),
        (f"fwd+bwd\n{step_unit}", [num(r.fwd_bwd_time_s / step_div) for r in rows]),
        (f"optim\n{step_unit}", [num(r.optimizer_time_s / step_div) for r in rows]),
        ("samples\n/s", [("" if r.timing_stable else "~") + format_count(r.samples_per_s) for r in rows]),
    ]  # fmt: skip
    if any(r.tokens_per_s is not None for r in rows):
        columns.append(("tokens\n/s", [format_count(r.tokens_per_s) for r in rows]))
    if any(r.mfu is not None for r in rows):
        columns.append(("MFU", [f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-" for r in rows]))
    if any(r.lr is not None for r in rows):
        columns.append(("LR", lrs))
        columns.append(
            (
                "warm-up\nsteps",
                [str(r.warmup_steps) if r.warmup_steps is not None else r.warmup for r in rows],
            )
        )
    if any(r.projected_seconds is not None for r in rows):
        columns.append(
            (
                f"run\n{run_unit}",
                [num(r.projected_seconds / run_div if r.projected_seconds else None) for r in rows],
            )
        )
    dropped: list[str] = []
    if width is not None:
        for name in DROP_ORDER:
            if _width(columns) + 2 <= width:  # the box's edges: a space each side
                break
            kept = [c for c in columns if not c[0].startswith(name)]
            if len(kept) < len(columns):
                dropped += [c[0].split("\n")[0] for c in columns if c[0].startswith(name)]
                columns = kept
    table = Table(
        title="Plan", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0)
    )
    for name, _ in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for i, r in enumerate(rows):
        style = "bold green" if r.micro_batch_size == chosen else ("dim" if not r.eligible else "")
        table.add_row(*(cells[i] for _, cells in columns), style=style)
    notes = []
    excluded: dict[str, list[int]] = {}
    for r in rows:
        if r.excluded_because is not None:
            excluded.setdefault(r.excluded_because, []).append(r.micro_batch_size)
    for why, sizes in excluded.items():
        notes.append(f"dim {', '.join(map(str, sizes))}: not eligible, {why}")
    if any(not r.divides_exactly for r in rows):
        notes.append(
            f"*: global batch rounded up from the target {plan.settings.target_global_batch}"
        )
    if any(not r.timing_stable for r in rows):
        notes.append(
            f"~: timing unstable (steps varied by more than {UNSTABLE_SPREAD:.0%}; "
            "the machine was busy)"
        )
    if threads is not None:
        notes.append(f"timed on {threads} CPU thread{'s' if threads > 1 else ''}")
    if dropped:
        notes.append(f"columns left out to fit the terminal: {', '.join(dropped)} (see --json)")
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table


def _width(columns: list[tuple[str, list[str]]]) -> int:
    """The table's width: each column as wide as its widest header line or cell, one space
    between columns."""
    widths = [
        max(len(line) for text in [name, *cells] for line in text.split("\n"))
        for name, cells in columns
    ]
    return sum(widths) + len(widths) - 1


def recommendation_panel(plan: Plan) -> Panel:
    r = plan.recommended
    s = plan.settings
    if r is None:
        return Panel(
            Text("No recommendation: " + plan.reason, style="bold red"),
            title="Recommendation",
            title_align="left",
        )
    text = Text()
    text.append("micro-batch ", style="bold")
    text.append(str(r.micro_batch_size), style="bold green")
    text.append(f" × {r.grad_accum_steps} accumulation step{'s' if r.grad_accum_steps > 1 else ''}")
    text.append(f" × {s.world_size} device{'s' if s.world_size > 1 else ''}")
    text.append(f" = global batch {r.global_batch_size}")
    if s.tokens_per_sample:
        text.append(f" ({r.global_batch_size * s.tokens_per_sample:,} tokens)")
    text.append("\n")
    if r.lr is not None:
        assert s.base_lr is not None and s.base_batch_size is not None
        text.append(f"learning rate {r.lr:.3g}", style="bold")
        text.append(
            f" ({s.lr_rule} scaling from {s.base_lr:g} at batch {s.base_batch_size}, ×{r.lr_ratio:g} batch)"
        )
        warm = (
            f"{r.warmup_steps} steps"
            if r.warmup_steps is not None
            else "set steps from your run length"
        )
        text.append(
            f"; warm-up {r.warmup}: {warm}\n" if r.warmup != "none" else "; no warm-up needed\n"
        )
    text.append(
        f"peak {format_bytes(r.peak_bytes)}"
        + (f" ({100 * r.peak_fraction:.0f}% of the limit)" if r.peak_fraction is not None else "")
        + f", {format_count(r.samples_per_s)} samples/s"
        + (f", {format_count(r.tokens_per_s)} tokens/s" if r.tokens_per_s else "")
        + (f", MFU {100 * r.mfu:.1f}%" if r.mfu is not None else "")
        + "\n"
    )
    if r.projected_seconds is not None:
        text.append(
            f"projected run: {format_seconds(r.projected_seconds)} for {r.optimizer_steps:,} optimizer "
            f"steps of {format_seconds(r.update_time_s)}\n",
            style="bold",
        )
    text.append(f"why: {plan.reason}\n", style="dim")
    text.append("\nHugging Face Trainer\n", style="bold")
    text.append("\n".join(f"  {line}" for line in hf_snippet(r)) + "\n")
    text.append("\nPyTorch loop\n", style="bold")
    text.append("\n".join(f"  {line}" for line in loop_snippet(r, s.optimizer)))
    return Panel(text, title="Recommendation", title_align="left", expand=False)


def hf_snippet(r: Row) -> list[str]:
    """TrainingArguments for the recommendation, one argument per line (short lines: a
    terminal never wraps them, so they paste as they are)."""
    args = [
        f"per_device_train_batch_size={r.micro_batch_size},",
        f"gradient_accumulation_steps={r.grad_accum_steps},",
    ]
    if r.lr is not None:
        args.append(f"learning_rate={r.lr:.4g},")
    if r.warmup_steps:
        args.append(f"warmup_steps={r.warmup_steps},")
    return ["TrainingArguments(", *(f"    {a}" for a in args), "    ...", ")"]


def loop_snippet(r: Row, optimizer: str) -> list[str]:
    """A plain PyTorch accumulation loop for the recommendation, in short lines."""
    lines = [f"micro_batch_size, grad_accum_steps = {r.micro_batch_size}, {r.grad_accum_steps}"]
    torch_class = OPTIMIZER_CLASSES.get(optimizer)
    if r.lr is not None and torch_class:
        lines += [
            f"optimizer = torch.optim.{torch_class}(",
            f"    model.parameters(), lr={r.lr:.4g}",
            ")",
        ]
    if r.warmup_steps:
        lines += [
            "scheduler = torch.optim.lr_scheduler.LambdaLR(",
            f"    optimizer, lambda s: min(1.0, (s + 1) / {r.warmup_steps})",
            ")",
        ]
    return [
        *lines,
        "for i, (x, y) in enumerate(loader):  # micro-batches",
        "    loss = loss_fn(model(x), y) / grad_accum_steps",
        "    loss.backward()",
        "    if (i + 1) % grad_accum_steps == 0:",
        "        optimizer.step()" + ("; scheduler.step()" if r.warmup_steps else ""),
        "        optimizer.zero_grad(set_to_none=True)",
    ]


def plan_chart(plan: Plan, width: int = 24) -> Table:
    """Throughput and peak memory against micro-batch, as bars."""
    rows = plan.rows
    top_rate = max((r.samples_per_s for r in rows), default=0.0)
    peaks = [r.peak_bytes or 0 for r in rows]
    top_peak = max([*peaks, plan.settings.limit_bytes or 0], default=0)
    table = Table(
        title="Throughput and memory by micro-batch", title_justify="left", box=None, pad_edge=False
    )
    table.add_column("micro", justify="right")
    table.add_column("samples/s", no_wrap=True)
    table.add_column("peak memory (│ = headroom)", no_wrap=True)
    limit = plan.settings.limit_bytes
    mark = round(width * plan.settings.headroom * limit / top_peak) if limit and top_peak else None
    for r in rows:
        rate = (
            bar(r.samples_per_s, top_rate, width).ljust(width) + f" {format_count(r.samples_per_s)}"
        )
        mem = bar(r.peak_bytes or 0, top_peak, width).ljust(width)
        if mark is not None and mark < width:
            mem = mem[:mark] + "│" + mem[mark + 1 :]
        table.add_row(
            str(r.micro_batch_size),
            Text(rate, style="cyan"),
            Text(
                mem + f" {format_bytes(r.peak_bytes)}",
                style="magenta" if r.within_headroom else "dim",
            ),
        )
    return table


def plan_csv(plan: Plan) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["recommended", *PLAN_COLUMNS])
    chosen = plan.recommended.micro_batch_size if plan.recommended else None
    for r in plan.rows:
        d = r.to_dict()
        writer.writerow(
            [r.micro_batch_size == chosen, *("" if d[c] is None else d[c] for c in PLAN_COLUMNS)]
        )
    return buf.getvalue()


def plan_markdown(plan: Plan, run: PlanRun, source: str) -> str:
    fm = run.find_max
    s = plan.settings
    lines = [
        f"## batchprobe plan: {source}",
        "",
        f"Device {fm.device.device} ({fm.device.name}), torch {fm.device.torch_version}; max micro-batch "
        f"**{fm.max_batch_size}**; target global batch {s.target_global_batch} on {s.world_size} device(s).",
        "",
        "| micro | accum | global | peak | % limit | fwd+bwd s | optimizer s | samples/s | tokens/s | MFU | LR | warm-up steps | projected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    chosen = plan.recommended.micro_batch_size if plan.recommended else None
    lrs = lr_column([r.lr for r in plan.rows])
    for r, lr in zip(plan.rows, lrs, strict=True):
        star = " ★" if r.micro_batch_size == chosen else ""
        lines.append(
            f"| {r.micro_batch_size}{star} | {r.grad_accum_steps} | {r.global_batch_size} | "
            f"{format_bytes(r.peak_bytes)} | {percent(r.peak_fraction or 0, 1) if r.peak_fraction is not None else '-'} | "
            f"{r.fwd_bwd_time_s:.4g} | {r.optimizer_time_s:.4g} | {format_count(r.samples_per_s)} | "
            f"{format_count(r.tokens_per_s)} | {f'{100 * r.mfu:.1f}%' if r.mfu is not None else '-'} | "
            f"{lr} | {r.warmup_steps if r.warmup_steps is not None else '-'} | "
            f"{format_seconds(r.projected_seconds)} |"
        )
    if plan.recommended:
        lines += ["", f"**Recommended:** micro-batch {chosen} — {plan.reason}."]
    warnings = [*fm.warnings, *run.warnings, *plan.warnings]
    if warnings:
        lines += ["", *(f"- ⚠ {w}" for w in warnings)]
    return "\n".join(lines) + "\n"


def plan_plot(plan: Plan, source: str) -> bytes:
    """Throughput and peak memory against micro-batch: PNG bytes (needs matplotlib)."""
    plt = pyplot()
    xs = [r.micro_batch_size for r in plan.rows]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=120)
    ax1.plot(xs, [r.samples_per_s for r in plan.rows], "o-", color="tab:blue", label="samples/s")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("micro-batch size")
    ax1.set_ylabel("samples/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(
        xs,
        [(r.peak_bytes or 0) / 1024**2 for r in plan.rows],
        "s--",
        color="tab:purple",
        label="peak MiB",
    )
    ax2.set_ylabel("peak memory (MiB)", color="tab:purple")
    limit = plan.settings.limit_bytes
    if limit:
        ax2.axhline(
            plan.settings.headroom * limit / 1024**2,
            color="tab:red",
            lw=0.8,
            ls=":",
            label="headroom",
        )
    if plan.recommended:
        ax1.axvline(plan.recommended.micro_batch_size, color="tab:green", lw=1, label="recommended")
    ax1.set_title(f"batchprobe plan: {source}")
    fig.tight_layout()
    return png(fig)
