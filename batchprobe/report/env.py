"""env: the environment as a two-column table."""

from __future__ import annotations

from typing import Any

from rich.table import Table


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
