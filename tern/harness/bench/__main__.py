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
from tern.harness.bench.report import legend, missed, render_table, report
from tern.toolchain import cache_dir


def runner(name: str) -> Callable[[Lab], list[Measurement]]:
    """The ``bench_<name>`` function of stage module ``name``, imported only when it runs
    (``--only codec`` needs neither the gateway nor the bridge)."""
    module = importlib.import_module(f"tern.harness.bench.{name}")
    return getattr(module, f"bench_{name}")


REPO = Path(__file__).resolve().parents[3]


def run_benchmarks(names: Sequence[str], sizes: Sizes, workdir: Path, progress: Callable[[str], None],
                   explicit: Sequence[str] | None = None) -> tuple[list[Measurement], str, dict]:
    """Run the named benchmarks in order; return their measurements, which Kafka was used and
    the series for the figures. ``explicit``: the stages asked for by name (``--only``); by
    default ``names`` unless they are all of them."""
    # A stage asked for by name (--only): the apache stage then runs even in a quick run,
    # starting its cluster. Leaving stages out (--skip) names none.
    if explicit is None:
        explicit = names if tuple(names) != BENCHMARKS else ()
    lab = Lab(sizes, workdir, explicit=explicit)
    results: list[Measurement] = []
    stage_seconds: dict[str, float] = {}
    lab.series["stage_seconds"] = stage_seconds
    try:
        for name in names:
            progress(name)
            started = time.monotonic()
            results.extend(runner(name)(lab))
            # Each stage's share of the run's time, in the log and the docs of every run.
            stage_seconds[name] = round(time.monotonic() - started, 1)
            progress(f"{name} took {stage_seconds[name]:.0f} s")
    finally:
        lab.close()
    return results, lab.kafka_kind, lab.series


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: --quick, --only NAME / --skip NAME (repeatable), --json PATH."""
    parser = argparse.ArgumentParser(prog="python -m tern.harness.bench", description=bench_package.__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: the whole run takes well under 30 s")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--skip", action="append", choices=BENCHMARKS, metavar="NAME", default=[],
                        help="run every benchmark (or every --only one) but this one (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON (default .cache/bench/latest.json)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="folder to write benchmarks.md, benchmark-history.md and the PNGs into "
                             "(default: the repository's docs/ for a full run of every benchmark; none for --quick, --only or --skip)")
    parser.add_argument("--no-docs", action="store_true", help="write no docs at all")
    parser.add_argument("--enforce", choices=("yes", "no", "auto"), default="auto",
                        help="exit 1 when a target is missed (auto: yes for a full run, no for --quick)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table, write the JSON; one line and exit 2 on error."""
    from rich.console import Console

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    if not console.is_terminal:
        # Piped (make, CI logs): the table is read afterwards, not on an 80-column screen.
        console = Console(width=max(console.width, 160))
    names = [n for n in BENCHMARKS if (not args.only or n in args.only) and n not in args.skip]
    sizes, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    bench_root = cache_dir() / "bench"
    out_path = args.json or bench_root / "latest.json"
    started = time.monotonic()
    try:
        bench_root.mkdir(parents=True, exist_ok=True)
        # On the repository's disk, not a tmpfs: the outbox's fsyncs must cost what they cost.
        with tempfile.TemporaryDirectory(prefix="run-", dir=bench_root) as workdir:
            results, kafka, series = run_benchmarks(names, sizes, Path(workdir), lambda n: console.print(f"[dim]bench: {n}…[/dim]"),
                                                    explicit=args.only or ())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except (TernError, OSError, asyncio.TimeoutError, sqlite3.Error) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"bench: error: {message}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    doc = report(results, mode, kafka, elapsed)
    doc["stage_seconds"] = series.get("stage_seconds", {})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    info = doc["machine"]
    console.print(render_table(results, f"Tern benchmarks ({mode}, {info['cpus']} cores, {elapsed:.0f} s)"))
    for line in legend(results):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    console.print(f"ratio = Tern / baseline, both measured in this run (Kafka: {kafka or 'not used'}). JSON: {out_path}",
                  highlight=False, soft_wrap=True)
    docs_dir = None if args.no_docs else args.docs
    if docs_dir is None and not args.no_docs and not args.quick and not args.only and not args.skip:
        docs_dir = REPO / "docs"
    if docs_dir is not None:
        from tern.harness.bench.docs import write_docs

        for path in write_docs(docs_dir, doc, results, series, legend(results)):
            console.print(f"[dim]wrote {path}[/dim]", highlight=False)
    failed = missed(results)
    for m in failed:
        console.print(f"[bold red]target missed[/bold red]: {m.name}: {m.target} "
                      f"(figure {m.figure:,.2f}, ratio {m.ratio:.2f})", highlight=False, soft_wrap=True)
    enforce = args.enforce == "yes" or (args.enforce == "auto" and not args.quick)
    if failed and enforce:
        print(f"bench: {len(failed)} target(s) missed: {', '.join(m.name for m in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
