"""Results -> rich renderables, JSON-able dicts, CSV, Markdown and plots. Never prints.

Rendering is data in, renderable out; `cli.py` decides where it goes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from batchprobe.backends import DeviceInfo
from batchprobe.check import CheckRun
from batchprobe.noise import samples_factor, steps_factor
from batchprobe.planning import Plan
from batchprobe.probe import FindMaxResult, ProbeResult
from batchprobe.search import Outcome
from batchprobe.session import EstimateRun, NoiseRun, PlanRun
from batchprobe.units import format_bytes, format_count, format_seconds

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


def probe_line(index: int, p: ProbeResult) -> str:
    """One probe as a log line, for terminals without live display (CI logs)."""
    note = f"  {p.failure.kind}: {p.failure.message}" if p.failure else ""
    if p.reused:
        note += "  (from an earlier probe's peak)"
    return (
        f"probe {index:>2}  batch {p.batch_size:>7}  {p.outcome.value:<5}  "
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
    started = f", from the fake-tensor estimate {result.guess}" if result.guess is not None else ""
    lines.append(
        f"{len(result.probes)} probes ({result.strategy} search{started}) in "
        f"{format_seconds(result.seconds)}",
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
        "estimated_max_batch_size": result.guess,
        "model": source,
        "provenance": "measured",
        "interrupted": result.interrupted,
        "warnings": list(result.warnings),
    }
    if result.world_size > 1:
        out["world_size"] = result.world_size
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


# --------------------------------------------------------------------------- plan


def _time_unit(values: Sequence[float | None]) -> tuple[str, float]:
    """A unit for a column of durations: (label, divisor)."""
    known = [v for v in values if v is not None]
    top = max(known) if known else 0.0
    if top < 1:
        return "ms", 1e-3
    if top < 120:
        return "s", 1.0
    if top < 2 * 3600:
        return "min", 60.0
    if top < 3 * 86400:
        return "h", 3600.0
    return "days", 86400.0


def _byte_unit(values: Sequence[int | None]) -> tuple[str, float]:
    known = [v for v in values if v is not None]
    top = max(known) if known else 0
    return ("GiB", 1024.0**3) if top >= 10 * 1024**3 else ("MiB", 1024.0**2)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    if magnitude >= digits:
        return f"{x:,.0f}"
    return f"{x:.{max(0, digits - 1 - magnitude)}f}"


def _lr(x: float | None) -> str:
    """Compact learning rates: 0.4, 0.0125, 6.0e-4."""
    if x is None:
        return "-"
    if 1e-2 <= x < 100:
        return f"{x:.3g}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plan_table(plan: Plan) -> Table:
    """One row per candidate micro-batch; units in the headers; ★ marks the recommendation."""
    rows = plan.rows
    mem_unit, mem_div = _byte_unit([r.peak_bytes for r in rows])
    step_unit, step_div = _time_unit(
        [r.fwd_bwd_time_s for r in rows] + [r.optimizer_time_s for r in rows]
    )
    run_unit, run_div = _time_unit([r.projected_seconds for r in rows])
    has_tokens = any(r.tokens_per_s is not None for r in rows)
    has_mfu = any(r.mfu is not None for r in rows)
    has_lr = any(r.lr is not None for r in rows)
    has_run = any(r.projected_seconds is not None for r in rows)
    table = Table(
        title="Plan", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0)
    )
    columns = [
        "micro",
        "accum",
        "global",
        f"peak\n{mem_unit}",
        "%\nlimit",
        f"fwd+bwd\n{step_unit}",
        f"optim\n{step_unit}",
        "samples\n/s",
    ]
    if has_tokens:
        columns.append("tokens\n/s")
    if has_mfu:
        columns.append("MFU")
    if has_lr:
        columns += ["LR", "warm-up\nsteps"]
    if has_run:
        columns.append(f"run\n{run_unit}")
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    chosen = plan.recommended.micro_batch_size if plan.recommended else None
    for r in rows:
        mark = "★ " if r.micro_batch_size == chosen else ""
        cells = [
            f"{mark}{r.micro_batch_size}",
            str(r.grad_accum_steps),
            f"{r.global_batch_size}" + ("" if r.divides_exactly else "*"),
            _num(r.peak_bytes / mem_div if r.peak_bytes is not None else None),
            f"{100 * r.peak_fraction:.0f}%" if r.peak_fraction is not None else "-",
            _num(r.fwd_bwd_time_s / step_div),
            _num(r.optimizer_time_s / step_div),
            format_count(r.samples_per_s),
        ]
        if has_tokens:
            cells.append(format_count(r.tokens_per_s))
        if has_mfu:
            cells.append(f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-")
        if has_lr:
            cells.append(_lr(r.lr))
            cells.append(str(r.warmup_steps) if r.warmup_steps is not None else r.warmup)
        if has_run:
            cells.append(_num(r.projected_seconds / run_div if r.projected_seconds else None))
        style = (
            "bold green"
            if r.micro_batch_size == chosen
            else ("dim" if not r.within_headroom else "")
        )
        table.add_row(*cells, style=style)
    notes = []
    if any(not r.within_headroom for r in rows):
        notes.append(f"dim: peak above the {plan.settings.headroom:.0%} headroom")
    if any(not r.divides_exactly for r in rows):
        notes.append(
            f"*: global batch rounded up from the target {plan.settings.target_global_batch}"
        )
    if notes:
        table.caption = "; ".join(notes)
        table.caption_justify = "left"
    return table


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
    hf = [
        f"per_device_train_batch_size={r.micro_batch_size}",
        f"gradient_accumulation_steps={r.grad_accum_steps}",
    ]
    if r.lr is not None:
        hf.append(f"learning_rate={r.lr:.4g}")
    if r.warmup_steps:
        hf.append(f"warmup_steps={r.warmup_steps}")
    text.append("  TrainingArguments(" + ", ".join(hf) + ", ...)\n")
    text.append("\nPyTorch loop\n", style="bold")
    lines = [
        f"micro_batch_size, grad_accum_steps = {r.micro_batch_size}, {r.grad_accum_steps}",
    ]
    torch_class = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}.get(s.optimizer)
    if r.lr is not None and torch_class:
        lines.append(f"optimizer = torch.optim.{torch_class}(model.parameters(), lr={r.lr:.4g})")
    if r.warmup_steps:
        lines.append(
            f"scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / {r.warmup_steps}))"
        )
    lines += [
        "for i, (x, y) in enumerate(loader):  # loader yields micro-batches",
        "    loss = loss_fn(model(x), y) / grad_accum_steps",
        "    loss.backward()",
        "    if (i + 1) % grad_accum_steps == 0:",
        "        optimizer.step()" + ("; scheduler.step()" if r.warmup_steps else ""),
        "        optimizer.zero_grad(set_to_none=True)",
    ]
    text.append("\n".join(f"  {line}" for line in lines))
    return Panel(text, title="Recommendation", title_align="left", expand=False)


def _bar(value: float, top: float, width: int) -> str:
    if top <= 0:
        return ""
    eighths = round(8 * width * value / top)
    full, part = divmod(eighths, 8)
    return "█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")


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
            _bar(r.samples_per_s, top_rate, width).ljust(width)
            + f" {format_count(r.samples_per_s)}"
        )
        mem = _bar(r.peak_bytes or 0, top_peak, width).ljust(width)
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


PLAN_COLUMNS = (
    "micro_batch_size", "grad_accum_steps", "global_batch_size", "peak_bytes", "peak_fraction",
    "fwd_bwd_time_s", "optimizer_time_s", "fwd_bwd_nosync_time_s", "step_time_s", "update_time_s",
    "samples_per_s",
    "tokens_per_s", "mfu", "lr", "warmup", "warmup_steps", "optimizer_steps", "projected_seconds",
    "within_headroom", "divides_exactly", "timing_spread",
)  # fmt: skip


def plan_json(run: PlanRun, source: str) -> dict[str, Any]:
    """The plan contract (DESIGN.md), plus the find-max part and provenance."""
    fm = run.find_max
    plan = run.plan
    settings = plan.settings if plan else None
    rows = [r.to_dict() for r in plan.rows] if plan else []
    recommended = plan.recommended.to_dict() if plan and plan.recommended else None
    return {
        "command": "plan",
        **device_dict(fm.device),
        "model": source,
        "max_batch_size": fm.max_batch_size,
        "world_size": settings.world_size if settings else None,
        "target_global_batch_size": settings.target_global_batch if settings else None,
        "tokens_per_sample": settings.tokens_per_sample if settings else None,
        "budget_bytes": fm.budget_bytes,
        "limit_bytes": fm.limit_bytes,
        "headroom": settings.headroom if settings else None,
        "headroom_batch_size": run.headroom_batch_size,
        "lr_scaling": settings.lr_rule if settings else None,
        "rows": rows,
        "recommended": recommended,
        "recommendation_reason": plan.reason if plan else None,
        "warnings": [*fm.warnings, *run.warnings, *(plan.warnings if plan else ())],
        "interrupted": run.interrupted,
        "noise_scale": noise_json(run.noise, source) if run.noise is not None else None,
        "find_max": find_max_json(fm, source),
        "provenance": {
            "peak_bytes": "measured (full training steps)",
            "fwd_bwd_time_s": "measured (median of timed steps after warm-up)",
            "optimizer_time_s": "measured",
            "samples_per_s": "derived from measured step times",
            "projected_seconds": "estimated: optimizer steps x measured update time",
            "mfu": "estimated: counted FLOPs / (measured time x datasheet peak)",
            "lr": "rule of thumb (linear: Goyal et al. 2017; sqrt: Malladi et al. 2022)",
        },
    }


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
    for r in plan.rows:
        star = " ★" if r.micro_batch_size == chosen else ""
        lines.append(
            f"| {r.micro_batch_size}{star} | {r.grad_accum_steps} | {r.global_batch_size} | "
            f"{format_bytes(r.peak_bytes)} | {percent(r.peak_fraction or 0, 1) if r.peak_fraction is not None else '-'} | "
            f"{r.fwd_bwd_time_s:.4g} | {r.optimizer_time_s:.4g} | {format_count(r.samples_per_s)} | "
            f"{format_count(r.tokens_per_s)} | {f'{100 * r.mfu:.1f}%' if r.mfu is not None else '-'} | "
            f"{_lr(r.lr)} | {r.warmup_steps if r.warmup_steps is not None else '-'} | "
            f"{format_seconds(r.projected_seconds)} |"
        )
    if plan.recommended:
        lines += ["", f"**Recommended:** micro-batch {chosen} — {plan.reason}."]
    warnings = [*fm.warnings, *run.warnings, *plan.warnings]
    if warnings:
        lines += ["", *(f"- ⚠ {w}" for w in warnings)]
    return "\n".join(lines) + "\n"


def plan_plot(plan: Plan, path: str | Path, source: str) -> None:
    """Throughput and peak memory against micro-batch, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from batchprobe.errors import MissingPackageError

        raise MissingPackageError("matplotlib", "plot", "--plot") from None
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
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- estimate


def estimate_table(run: EstimateRun) -> Table:
    """Traced peak and its breakdown at every traced batch size."""
    result = run.result
    assert result is not None
    points = result.points
    unit, div = _byte_unit([p.device_bytes for p in points])
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
            _num(b.parameters / div),
            _num(b.gradients / div),
            _num(b.optimizer_state / div),
            _num(b.activations / div),
            _num(b.other / div),
            _num(p.peak_bytes / div),
            _num(p.device_bytes / div),
            f"{100 * (p.device_bytes + result.allowance.context_bytes) / result.capacity_bytes:.0f}%",
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


def estimate_json(run: EstimateRun, source: str) -> dict[str, Any]:
    """The estimate contract (DESIGN.md), plus the target, the allowance and provenance."""
    result = run.result
    a = run.allowance
    out: dict[str, Any] = {
        "command": "estimate",
        "model": source,
        "target": run.target,
        "capacity_bytes": run.capacity_bytes,
        "allowance": {
            "fragmentation": a.fragmentation,
            "context_bytes": a.context_bytes,
            "round_to_bytes": a.round_to,
            "flash_attention": a.flash_attention,
        },
    }
    if result is not None:
        out.update(
            {
                "max_batch_size": result.max_batch_size,
                "exact": result.search.exact,
                "capped": result.search.capped,
                "usable_bytes": result.usable_bytes,
                "num_parameters": result.num_parameters,
                "points": [p.to_dict() for p in result.points],
                "seconds": round(result.seconds, 3),
                "provenance": "estimated: fake-tensor trace of full training steps",
            }
        )
    else:
        err = run.trace_error
        fm = run.fallback
        out.update(
            {
                "max_batch_size": fm.max_batch_size if fm else None,
                "points": [
                    {"batch_size": p.batch_size, "peak_bytes": p.peak_bytes, "breakdown": None}
                    for p in (fm.probes if fm else [])
                    if p.outcome is Outcome.FIT
                ],
                "trace_error": {"op": err.op if err else None, "message": str(err)},
                "provenance": "measured: real probes (the model could not be traced)",
                "find_max": find_max_json(fm, source) if fm else None,
            }
        )
    return out


# --------------------------------------------------------------------------- check


def _metric_value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name == "peak_bytes":
        return format_bytes(value)
    if name == "max_batch_size":
        return f"{value:g}"
    return f"{format_count(value)}/s"


def check_table(run: CheckRun) -> Table:
    table = Table(title="Checks", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("check", "source", "expected", "measured", "result", "detail"):
        table.add_column(name, no_wrap=name != "detail", overflow="fold")
    for o in run.outcomes:
        d = o.to_dict()
        sign = "≥" if o.expectation.minimum else "≤"
        table.add_row(
            d["name"],
            d["source"],
            f"{sign} {_metric_value(o.expectation.name, o.threshold)}",
            _metric_value(o.expectation.name, o.measured),
            Text("pass", style="green") if o.passed else Text("FAIL", style="bold red"),
            Text(o.detail, style="dim"),
        )
    table.caption = f"tolerance {run.outcomes[0].tolerance:.0%} included" if run.outcomes else None
    table.caption_justify = "left"
    return table


def check_json(run: CheckRun, source: str) -> dict[str, Any]:
    """The check contract (DESIGN.md), plus device, provenance and the baseline written."""
    out = {
        "command": "check",
        "passed": run.passed,
        "checks": [o.to_dict() for o in run.outcomes],
        **device_dict(run.device),
        "model": source,
        "seconds": round(run.seconds, 3),
        "interrupted": run.interrupted,
    }
    if run.baseline is not None:
        out["baseline"] = run.baseline
    return out


def junit_xml(run: CheckRun, source: str) -> str:
    """JUnit XML: one test case per check, for CI systems that render test reports."""
    from xml.etree import ElementTree as ET

    failures = sum(not o.passed for o in run.outcomes)
    suite = ET.Element(
        "testsuite",
        name="batchprobe check",
        tests=str(len(run.outcomes)),
        failures=str(failures),
        errors="0",
        time=f"{run.seconds:.3f}",
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("model", source),
        ("device", run.device.device),
        ("device_name", run.device.name),
        ("torch_version", run.device.torch_version),
    ):
        ET.SubElement(props, "property", name=key, value=str(value))
    for o in run.outcomes:
        d = o.to_dict()
        case = ET.SubElement(
            suite, "testcase", classname="batchprobe.check", name=d["name"], time="0"
        )
        message = (
            f"{d['name']}: expected {d['comparison']} {_metric_value(o.expectation.name, o.threshold)}, "
            f"measured {_metric_value(o.expectation.name, o.measured)}"
        )
        if not o.passed:
            failure = ET.SubElement(case, "failure", message=message, type="regression")
            failure.text = o.detail
        else:
            ET.SubElement(case, "system-out").text = f"{message}. {o.detail}"
    root = ET.Element("testsuites", tests=str(len(run.outcomes)), failures=str(failures))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def check_markdown(run: CheckRun, source: str) -> str:
    """A Markdown summary (for $GITHUB_STEP_SUMMARY)."""
    verdict = "✅ passed" if run.passed else "❌ failed"
    lines = [
        f"### batchprobe check: {verdict}",
        "",
        f"`{source}` on {run.device.device} ({run.device.name}), torch {run.device.torch_version}",
        "",
        "| check | expected | measured | result |",
        "|---|---|---|---|",
    ]
    for o in run.outcomes:
        d = o.to_dict()
        sign = "≥" if o.expectation.minimum else "≤"
        lines.append(
            f"| {d['name']} | {sign} {_metric_value(o.expectation.name, o.threshold)} | "
            f"{_metric_value(o.expectation.name, o.measured)} | {'pass' if o.passed else '**FAIL**'} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- noise scale


def noise_panel(run: NoiseRun, source: str, target_global: int | None = None) -> Panel:
    stats = run.stats
    b = stats.b_simple()
    err = stats.stderr()
    text = Text()
    text.append("Gradient noise scale B_simple ≈ ", style="bold")
    if not math.isfinite(b) or b <= 0:
        text.append("not resolved", style="bold yellow")
        text.append(
            "\nThe mean gradient is lost in its noise at these batch sizes (|G|² estimate ≤ 0): "
            "measure with larger noise.small_batch_size / accumulation, or more noise.steps.\n"
        )
        return Panel(text, title="noise-scale", title_align="left", expand=False)
    text.append(f"{b:,.0f}", style="bold green")
    text.append(f" ± {err:,.0f}" if math.isfinite(err) else " (uncertainty not resolved)")
    text.append(
        f"  ({stats.steps} big batches of {stats.big_batch_size} = {stats.small_batch_size} × "
        f"{stats.big_batch_size // stats.small_batch_size}, at fixed weights; {stats.stopped})\n",
        style="dim",
    )
    text.append(
        f"|G|² ≈ {stats.g2():.4g}, tr(Σ) ≈ {stats.trace_sigma():.4g} per sample\n", style="dim"
    )
    text.append("\nWhat it means: ", style="bold")
    text.append(
        f"the critical batch size is about {b:,.0f} samples. Below it, doubling the batch nearly "
        "halves the optimizer steps — every sample is used well; above it, doubling buys little: "
        "steps S ≈ S_min (1 + B_noise/B) and samples E ≈ E_min (1 + B/B_noise) "
        "(McCandlish et al. 2018).\n"
    )
    sizes = sorted(
        {max(1, round(b * f)) for f in (0.25, 0.5, 1, 2, 4, 8)}
        | ({target_global} if target_global else set())
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for col in ("global batch", "× B_noise", "steps vs fewest", "samples vs fewest"):
        table.add_column(col, justify="right")
    for size in sizes:
        table.add_row(
            f"{size:,}" + (" (target)" if size == target_global else ""),
            f"{size / b:.2g}",
            f"{steps_factor(size, b):.2f}×",
            f"{samples_factor(size, b):.2f}×",
        )
    note = Text(
        "The noise scale grows as training goes on (the gradient shrinks faster than its noise): "
        "measure again later in training, or set noise.warmup_steps.",
        style="dim",
    )
    return Panel(Group(text, table, note), title="noise-scale", title_align="left", expand=False)


def noise_json(run: NoiseRun, source: str) -> dict[str, Any]:
    """The noise-scale contract (DESIGN.md), plus the parts of the estimate."""
    stats = run.stats
    b = stats.b_simple()
    err = stats.stderr()
    finite = math.isfinite(b) and b > 0
    return {
        "command": "noise-scale",
        **device_dict(run.device),
        "model": source,
        "b_simple": b if finite else None,
        "b_simple_stderr": err if finite and math.isfinite(err) else None,
        "steps": stats.steps,
        "g2": stats.g2() if stats.steps else None,
        "trace_sigma": stats.trace_sigma() if stats.steps else None,
        "small_batch_size": stats.small_batch_size,
        "big_batch_size": stats.big_batch_size,
        "stopped": stats.stopped,
        "seconds": round(run.seconds, 3),
        "provenance": "measured: two-batch estimator (McCandlish et al. 2018, App. A), bootstrap stderr",
    }
