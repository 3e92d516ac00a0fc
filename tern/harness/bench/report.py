"""The table, the legend and the JSON document of a run."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tern.harness.bench.common import Measurement

if TYPE_CHECKING:
    from rich.table import Table


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "platform": platform.platform(), "python": platform.python_version()}


def format_figure(value: float, unit: str) -> str:
    """A figure with its unit, readable at a glance."""
    if unit.startswith("bytes"):
        return f"{value:,.0f} B"
    return f"{value:,.0f}/s"


def render_table(results: Sequence[Measurement], title: str) -> "Table":
    """The results as a rich Table."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measurement")
    table.add_column("Tern", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("n", justify="right")
    for m in results:
        table.add_row(m.name, format_figure(m.figure, m.unit), format_figure(m.baseline, m.unit),
                      f"{m.ratio:.2f}", f"{m.count:,}")
    return table


def legend(results: Sequence[Measurement]) -> list[str]:
    """One line per measurement: what the Tern figure and the baseline measure."""
    return [f"{m.name}: {m.what}; baseline: {m.baseline_what}" for m in results]


def report(results: Sequence[Measurement], mode: str, kafka: str, elapsed: float) -> dict[str, Any]:
    """The JSON document for latest.json."""
    return {
        "schema": "tern.harness.bench/1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "elapsed_s": round(elapsed, 2),
        "machine": machine_info(),
        "kafka": kafka,
        "measurements": [m.as_json() for m in results],
    }
