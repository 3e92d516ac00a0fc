"""``python -m tern.harness.bench``: run the stages, print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from tern.core.errors import TernError
from tern.harness import bench as bench_package
from tern.harness.bench.common import BENCHMARKS, FULL, QUICK, Measurement, Sizes
from tern.harness.bench.lab import Lab
from tern.harness.bench.report import legend, render_table, report
from tern.toolchain import cache_dir


def runner(name: str) -> Callable[[Lab], list[Measurement]]:
    """The ``bench_<name>`` function of stage module ``name``, imported only when it runs
    (``--only codec`` needs neither the gateway nor the bridge)."""
    module = importlib.import_module(f"tern.harness.bench.{name}")
    return getattr(module, f"bench_{name}")


def run_benchmarks(names: Sequence[str], sizes: Sizes, workdir: Path, progress: Callable[[str], None]) -> tuple[list[Measurement], str]:
    """Run the named benchmarks in order; return their measurements and which Kafka was used."""
    lab = Lab(sizes, workdir)
    results: list[Measurement] = []
    try:
        for name in names:
            progress(name)
            results.extend(runner(name)(lab))
    finally:
        lab.close()
    return results, lab.kafka_kind


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: --quick, --only NAME (repeatable), --json PATH."""
    parser = argparse.ArgumentParser(prog="python -m tern.harness.bench", description=bench_package.__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: the whole run takes well under 30 s")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON (default .cache/bench/latest.json)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table, write the JSON; one line and exit 2 on error."""
    from rich.console import Console

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    sizes, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    bench_root = cache_dir() / "bench"
    out_path = args.json or bench_root / "latest.json"
    started = time.monotonic()
    try:
        bench_root.mkdir(parents=True, exist_ok=True)
        # On the repository's disk, not a tmpfs: the outbox's fsyncs must cost what they cost.
        with tempfile.TemporaryDirectory(prefix="run-", dir=bench_root) as workdir:
            results, kafka = run_benchmarks(names, sizes, Path(workdir), lambda n: console.print(f"[dim]bench: {n}…[/dim]"))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except (TernError, OSError, asyncio.TimeoutError, sqlite3.Error) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"bench: error: {message}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    doc = report(results, mode, kafka, elapsed)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    info = doc["machine"]
    console.print(render_table(results, f"Tern benchmarks ({mode}, {info['cpus']} cores, {elapsed:.0f} s)"))
    for line in legend(results):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    console.print(f"ratio = Tern / baseline, both measured in this run (Kafka: {kafka or 'not used'}). JSON: {out_path}",
                  highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
