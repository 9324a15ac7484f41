"""Printing benchmark results: a rich table for people, JSON for machines, an optional plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], console: Console | None = None) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    (console or Console()).print(table)


def emit(result: Mapping[str, Any], as_json: bool, render, plot: Path | None = None, plot_fn=None) -> None:
    """Print ``result`` as JSON or via ``render(result)``; draw ``plot_fn(result, plot)`` when asked."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result)
    if plot is not None and plot_fn is not None:
        plot_fn(result, plot)
