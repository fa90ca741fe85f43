"""What filled the peak: the one-line reading, the largest modules and the largest tensors."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from batchprobe.report.json import DEFAULT_TOP
from batchprobe.results import PeakBreakdown
from batchprobe.units import format_bytes

__all__ = ["DEFAULT_TOP", "peak_view"]

_KIND = {
    "parameters": "param",
    "gradients": "grad",
    "optimizer_state": "optim",
    "activations": "activ",
    "other": "temp",
}


def peak_view(explained: PeakBreakdown, top: int = DEFAULT_TOP, size: str = "batch") -> Group:
    """The reading, then the `top` modules and the `top` tensors by bytes. `size` names what
    the size is (seq_len along that axis)."""
    peak = explained.peak_bytes or 1
    how = "measured" if explained.source == "measured" else "traced"
    head = Text()
    head.append(
        f"What fills the peak at {size} {explained.batch_size} ({how}, "
        f"{format_bytes(explained.peak_bytes)}): ",
        style="bold",
    )
    head.append(explained.reading)
    if top <= 0:
        return Group(head)
    modules = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), title_justify="left")
    modules.title = "by module"
    modules.add_column("module", overflow="fold", max_width=40)
    modules.add_column("bytes", justify="right", no_wrap=True)
    modules.add_column("%", justify="right", no_wrap=True)
    modules.add_column("kinds", overflow="fold")
    for m in explained.by_module[:top]:
        kinds = sorted(m.by_kind.items(), key=lambda kv: -kv[1])
        modules.add_row(
            m.module,
            format_bytes(m.bytes),
            f"{100 * m.bytes / peak:.0f}",
            " ".join(f"{_KIND.get(k, k)} {format_bytes(v)}" for k, v in kinds),
        )
    tensors = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), title_justify="left")
    tensors.title = "largest tensors"
    tensors.add_column("bytes", justify="right", no_wrap=True)
    tensors.add_column("kind", no_wrap=True)
    tensors.add_column("shape", no_wrap=True)
    tensors.add_column("dtype", no_wrap=True)
    tensors.add_column("op", no_wrap=True, overflow="ellipsis", max_width=14)
    tensors.add_column("module", overflow="fold", min_width=10)
    for t in explained.top_tensors[:top]:
        tensors.add_row(
            format_bytes(t.bytes),
            _KIND.get(t.kind, t.kind),
            "[" + ", ".join(str(d) for d in t.shape) + "]",
            t.dtype,
            t.op,
            t.module,
        )
    return Group(head, modules, tensors)
