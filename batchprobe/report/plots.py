"""PNG charts (matplotlib, optional): the memory timeline of traced steps, and the max
micro-batch against the sequence length. plan's chart is in `report.plan`."""

from __future__ import annotations

import io
from typing import Any

from batchprobe.results import CATEGORIES, SweepPoint, Timeline

#: colours of the kinds of memory, as stacked from the bottom
KIND_COLOURS = {
    "parameters": "tab:blue",
    "gradients": "tab:orange",
    "optimizer_state": "tab:green",
    "activations": "tab:purple",
    "other": "tab:gray",
}
PHASE_COLOURS = {"forward": "#e8f0fe", "backward": "#fdecea", "optimizer": "#e6f4ea"}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or the error that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from batchprobe.errors import MissingPackageError

        raise MissingPackageError("matplotlib", "plot", "--plot") from None
    return plt


def png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


def timeline_plot(timeline: Timeline, title: str) -> bytes:
    """Live bytes by kind, op by op, over the traced steps, the phases shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    xs = list(range(len(timeline)))
    stacks = [[by.get(k, 0) / 1024**2 for _, by in timeline] for k in CATEGORIES]
    labels = [k.replace("_", " ") for k in CATEGORIES]
    ax.stackplot(xs, stacks, labels=labels, colors=[KIND_COLOURS[k] for k in CATEGORIES])
    start = 0
    for i in range(1, len(timeline) + 1):  # shade each run of one phase
        if i == len(timeline) or timeline[i][0] != timeline[start][0]:
            colour = PHASE_COLOURS.get(timeline[start][0])
            if colour is not None:
                ax.axvspan(start, i - 1, color=colour, zorder=0, lw=0)
            start = i
    ax.set_xlabel("op (forward: blue band, backward: red, optimizer: green)")
    ax.set_ylabel("live memory (MiB)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return png(fig)


def sweep_plot(points: list[SweepPoint], title: str) -> bytes:
    """Max micro-batch and tokens per micro-batch against the sequence length."""
    plt = pyplot()
    fit = [p for p in points if p.max_batch_size]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=120)
    ax1.plot([p.seq_len for p in fit], [p.max_batch_size for p in fit], "o-", color="tab:blue")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("sequence length")
    ax1.set_ylabel("max micro-batch", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot([p.seq_len for p in fit], [p.tokens for p in fit], "s--", color="tab:purple")
    ax2.set_ylabel("tokens per micro-batch", color="tab:purple")
    ax1.set_title(title)
    fig.tight_layout()
    return png(fig)
