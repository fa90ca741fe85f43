"""noise-scale: B_simple, its uncertainty, and what it means for the batch size."""

from __future__ import annotations

import math

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from batchprobe.results import NoiseRun, samples_factor, steps_factor


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
