"""``python -m tern.harness.bench --quick`` runs every benchmark and writes a complete, consistent JSON.

Nothing here judges speed: figures are only checked to be positive and each ratio to be
figure / baseline (speed and memory targets are the benchmarks' business, not the tests').
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {
    "codec.decode_reading",
    "codec.batch_roundtrip",
    "outbox.add",
    "gateway.ingest",
    "bridge.kafka",
    "e2e.node_to_kafka",
    "firmware.heap_free",
}


def run_bench(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tern.harness.bench", "--json", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, COLUMNS="120"),
    )
    return proc, out


def test_quick_run_reports_every_measurement_as_a_ratio(tmp_path: Path) -> None:
    proc, out = run_bench(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick"
    assert doc["machine"]["cpus"] >= 1 and doc["date"]
    by_name = {m["name"]: m for m in doc["measurements"]}
    assert set(by_name) == EXPECTED
    for name, m in by_name.items():
        assert m["figure"] > 0 and m["baseline"] > 0, name
        assert math.isfinite(m["ratio"]) and m["ratio"] == pytest.approx(m["figure"] / m["baseline"], rel=1e-12), name
        assert m["count"] > 0 and m["unit"] and m["what"] and m["baseline_what"], name
    # The network paths really delivered everything they were timed on.
    for name in ("bridge.kafka", "e2e.node_to_kafka"):
        assert by_name[name]["details"]["distinct_in_kafka"] == by_name[name]["count"], name
    assert by_name["gateway.ingest"]["details"]["committed"] == by_name["gateway.ingest"]["count"]
    # The table names every measurement.
    for name in EXPECTED:
        assert name in proc.stdout


def test_only_runs_one_benchmark(tmp_path: Path) -> None:
    proc, out = run_bench(tmp_path, "--quick", "--only", "codec", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {m["name"] for m in json.loads(out.read_text())["measurements"]}
    assert names == {"codec.decode_reading", "codec.batch_roundtrip"}


def test_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env_missing = tmp_path / "no-such-micropython"
    proc = subprocess.run(
        [sys.executable, "-m", "tern.harness.bench", "--quick", "--only", "firmware", "--json", str(tmp_path / "x.json")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, TERN_MICROPYTHON=str(env_missing)),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bench: error:")]
    assert len(errors) == 1, proc.stderr
    assert not (tmp_path / "x.json").exists()
