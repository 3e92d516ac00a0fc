"""The table, the legend, the JSON document, and docs/benchmarks.md with its figures."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tern.harness.bench.common import Measurement

if TYPE_CHECKING:
    from rich.table import Table


def source_version() -> str:
    """The git commit measured (``+dirty`` with uncommitted changes), or empty outside a checkout."""
    import subprocess

    repo = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


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
    if unit.endswith("/s"):
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:,.1f} ms"
    return f"{value:,.2f} {unit}"


def format_rounds(m: Measurement) -> str:
    """``min / median / max`` of the rounds (or ``-`` for a single round)."""
    if len(m.rounds) < 2:
        return "1 round" if m.rounds else "-"
    values = sorted(m.rounds)
    mid = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    return f"{len(values)}: {short(values[0])} / {short(mid)} / {short(values[-1])}"


def short(value: float) -> str:
    """A compact number."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def status(m: Measurement) -> str:
    """``ok``, ``MISSED``, ``skipped`` or empty (no target)."""
    if m.skipped:
        return "skipped"
    if m.met is None:
        return ""
    return "ok" if m.met else "MISSED"


def ratio_text(m: Measurement) -> str:
    """The ratio, or a dash when there is none."""
    return "-" if math.isnan(m.ratio) else f"{m.ratio:.2f}"


def render_table(results: Sequence[Measurement], title: str) -> "Table":
    """The results as a rich Table."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measurement", no_wrap=True)
    table.add_column("Tern", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("rounds min/med/max", justify="right")
    table.add_column("target")
    table.add_column("n", justify="right")
    for m in results:
        target = f"{m.target} {status(m)}" if m.target else status(m)
        if m.skipped:
            table.add_row(m.name, "-", "-", "-", "-", target, "-")
            continue
        table.add_row(m.name, format_figure(m.figure, m.unit), format_figure(m.baseline, m.unit), ratio_text(m),
                      format_rounds(m), target, f"{m.count:,}")
    return table


def legend(results: Sequence[Measurement]) -> list[str]:
    """One line per measurement: what the Tern figure and the baseline measure (or why it was skipped)."""
    lines = []
    for m in results:
        if m.skipped:
            lines.append(f"{m.name}: SKIPPED: {m.skipped}")
        else:
            lines.append(f"{m.name}: {m.what}; baseline: {m.baseline_what}")
    return lines


def missed(results: Sequence[Measurement]) -> list[Measurement]:
    """Measurements whose target is missed."""
    return [m for m in results if m.met is False]


def report(results: Sequence[Measurement], mode: str, kafka: str, elapsed: float) -> dict[str, Any]:
    """The JSON document for latest.json."""
    return {
        "schema": "tern.harness.bench/2",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "commit": source_version(),
        "elapsed_s": round(elapsed, 2),
        "machine": machine_info(),
        "kafka": kafka,
        "measurements": [m.as_json() for m in results],
        "missed": [m.name for m in missed(results)],
    }
