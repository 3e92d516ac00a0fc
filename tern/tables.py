"""Tables for people, fitted to the terminal: every CLI table of Tern is built here.

A table wider than the terminal (80 columns when output is piped) would wrap every cell over
several lines. Each column has a priority instead: the least important columns give way
first until the table fits, and identifying columns (device ids) are never cut or wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

#: Priority of a column that must always be shown (and never be cut).
ESSENTIAL = 0


@dataclass(frozen=True)
class Column:
    """One column: its header, how it aligns, and how soon it gives way (higher: sooner)."""

    header: str
    drop_order: int = ESSENTIAL
    justify: str = "left"


def _cell_width(cell: Any) -> int:
    text = cell if isinstance(cell, Text) else Text(str(cell))
    return max((line.cell_len for line in text.split()), default=0)


def natural_width(columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> int:
    """The width of the table with ``columns`` when no cell wraps (rich's default box)."""
    widths = [
        max([_cell_width(col.header), *(_cell_width(row[i]) for row in rows)]) for i, col in enumerate(columns)
    ]
    # Each cell has one space of padding on each side; each column a border on its left,
    # and the table one on the right.
    return sum(widths) + 3 * len(widths) + 1


def fitted_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    width: int,
    **table_options: Any,
) -> Table:
    """A rich Table of ``rows`` whose columns fit ``width``: columns with the highest
    ``drop_order`` are left out first; essential ones always stay, whole and unwrapped."""
    keep = list(range(len(columns)))
    while natural_width([columns[i] for i in keep], [[row[i] for i in keep] for row in rows]) > width:
        droppable = [i for i in keep if columns[i].drop_order != ESSENTIAL]
        if not droppable:
            break
        keep.remove(max(droppable, key=lambda i: (columns[i].drop_order, i)))
    table = Table(**table_options)
    for i in keep:
        col = columns[i]
        essential = col.drop_order == ESSENTIAL
        table.add_column(col.header, justify=col.justify, no_wrap=essential, overflow="fold" if not essential else "ignore",
                         min_width=max([_cell_width(col.header), *(_cell_width(r[i]) for r in rows)]) if essential else None)
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    left_out = [columns[i].header for i in range(len(columns)) if i not in keep]
    if left_out:
        note = f"not shown at this width: {', '.join(left_out)}"
        table.caption = f"{table.caption}\n{note}" if table.caption else note
        table.caption_justify = "left"
    return table


def print_fitted(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[Any]], **table_options: Any) -> None:
    """Print ``rows`` as a table fitted to ``console``'s width."""
    console.print(fitted_table(columns, rows, console.width, **table_options))
