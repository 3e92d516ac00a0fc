"""`make demo` itself: a short run must end with a summary reporting 0 missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_short_demo_reports_zero_missing(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "tern.harness.demo", "--nodes", "2", "--duration", "6", "--interval-ms", "200",
         "--drain", "30", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Summary: readings per node" in out, out[-3000:]
    assert "0 missing" in out
    # The demo runs the secured setup: accounts and ACLs on the Pi broker, mutual TLS to the cloud.
    assert "secured: per-device accounts" in out
    assert "allow_anonymous false" in (tmp_path / "pi-mosquitto" / "mosquitto.conf").read_text()
    assert "require_certificate true" in (tmp_path / "cloud-mosquitto" / "mosquitto.conf").read_text()
    # Each node published in 6 s at 5 Hz: the summary rows carry real counts, not zeros.
    summary = out.split("Summary: readings per node", 1)[1]
    rows = [line for line in summary.splitlines() if line.strip().startswith("│ node-")]
    assert len(rows) == 2, out[-3000:]
    for row in rows:
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        sent, received, missing = int(cells[1]), int(cells[2]), int(cells[3])
        assert sent >= 10 and received == sent and missing == 0, row
