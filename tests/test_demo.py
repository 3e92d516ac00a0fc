"""`make demo` itself: the short story (``--quick``) on the real stack, piped at 80 columns.

The story's outcomes are checked on the JSON document the demo writes (``--json-file``),
whose figures it read from the system: the outbox depth from the gateway's stats, the will and
the command's outcome from their Kafka topics, the reading gaps from the readings topic, the
counts from reconciling the Pi broker with Kafka. The text is checked for what a person sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tern.harness.demo import Event, Narrator, document
from tern.harness.observe import reconcile


def test_short_story_happens_and_fits_80_columns(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    doc_path = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tern.harness.demo", "--quick", "--nodes", "3", "--workdir", str(tmp_path / "w"),
         "--json-file", str(doc_path)],
        capture_output=True, text=True, timeout=150, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    doc = json.loads(doc_path.read_text())
    events = {}
    for event in doc["events"]:
        events.setdefault(event["event"], event)  # the first of each kind
    said = [e["event"] for e in doc["events"]]
    for name in ("report", "uplink_cut", "outbox_growing", "node_killed", "outbox_before_return", "uplink_back",
                 "drained", "will_in_kafka", "command_sent", "command_outcome", "interval_changed", "final"):
        assert name in said, (name, said, out[-3000:])
    # Told in the order they happened.
    assert said.index("uplink_cut") < said.index("node_killed") < said.index("uplink_back") < said.index("command_sent")

    # 1. The nodes reported: readings in Kafka, with a node→Kafka latency.
    assert events["report"]["nodes"] == 3 and events["report"]["readings_in_kafka"] >= 6
    assert 0 < events["report"]["latency_ms"]["median"] < 2000

    # 2. The outbox grew during the cut while the nodes stayed acknowledged by their broker.
    growing, before_return = events["outbox_growing"], events["outbox_before_return"]
    assert 0 < growing["outbox_pending"] < before_return["outbox_pending"], (growing, before_return)
    for event in (growing, before_return):
        assert max(event["nodes_unacked"].values()) <= 2, event

    # 3. The killed node's last will: queued on the Pi, then read back from Kafka's status topic
    # as "offline", after the uplink returned.
    killed = events["node_killed"]
    assert killed["device"] == "node-3" and killed["will_queued"] is True
    assert before_return["outbox_status_pending"] >= 1
    will = events["will_in_kafka"]
    assert will["device"] == "node-3" and will["state"] == "offline" and will["gateway"] == "pi-gw-1", will
    assert will["after_return_s"] >= 0 and will["waited_on_pi_s"] > 1.0, will

    # 4. The backlog drained after the uplink returned.
    drained = events["drained"]
    assert drained["outbox_depths"][0] >= before_return["outbox_pending"] and drained["outbox_depths"][-1] == 0
    assert drained["seconds_to_empty"] is not None and drained["seconds_to_empty"] < 20 and drained["batches"] >= 1, drained

    # 5. The command's outcome is done, and node-1's rate in Kafka changed (1000 ms -> 250 ms).
    outcome = events["command_outcome"]
    assert outcome["outcome"] == "done", outcome
    assert outcome["reply"] == {"interval_ms": 250, "persisted": True, "applied": True}
    changed = events["interval_changed"]
    assert changed["device"] == "node-1" and changed["gaps_before"] >= 3 and changed["gaps_after"] >= 5, changed
    assert 850 <= changed["gap_before_ms"] <= 1300 and 150 <= changed["gap_after_ms"] <= 450, changed

    # 6. Nothing missing, the killed node included.
    assert doc["ok"] is True and doc["totals"]["missing"] == 0
    assert doc["totals"]["received"] == doc["totals"]["sent"] >= 20
    assert doc["nodes"]["node-3"]["sent"] >= 3 and doc["nodes"]["node-3"]["missing"] == 0

    # What a person sees: each event narrated, tables fitted to 80 columns (no cell wrapped,
    # every line within the width), the summary's rows carrying the same counts.
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "node-3 killed (SIGKILL)" in out and "last will in Kafka" in out and "backlog drained" in out
    summary = out.split("Summary: readings per node", 1)[1]
    rows = [line for line in summary.splitlines() if line.startswith("│ node-")]
    assert len(rows) == 3, out[-3000:]
    for row in rows:
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[1] == str(doc["nodes"][cells[0]]["sent"]) and cells[2] == cells[1] and cells[3] == "0", row
    assert "0 missing" in out

    # The demo runs the secured setup: accounts and ACLs on the Pi broker, mutual TLS to the cloud.
    assert "secured: per-device accounts" in out
    assert "allow_anonymous false" in (tmp_path / "w" / "pi-mosquitto" / "mosquitto.conf").read_text()
    assert "require_certificate true" in (tmp_path / "w" / "cloud-mosquitto" / "mosquitto.conf").read_text()


def test_json_document_has_per_node_counts_and_the_events() -> None:
    result = reconcile([("node-1", "b", 1), ("node-1", "b", 2), ("node-2", "b", 1)],
                       [("node-1", "b", 2), ("node-1", "b", 1), ("node-1", "b", 2)])
    doc = document(result, [Event("report", 4.04, "2 nodes report", {"readings_in_kafka": 3})], extra={"x": 1})
    assert doc["schema"] == "tern.demo/1" and doc["ok"] is False
    assert doc["nodes"] == {
        "node-1": {"sent": 2, "received": 2, "missing": 0, "duplicated": 1, "out_of_order": 1},
        "node-2": {"sent": 1, "received": 0, "missing": 1, "duplicated": 0, "out_of_order": 0},
    }
    assert doc["totals"]["missing"] == 1
    assert doc["events"] == [{"event": "report", "at_s": 4.04, "says": "2 nodes report", "readings_in_kafka": 3}]
    assert doc["extra"] == {"x": 1}
    json.dumps(doc)  # a document, as printed


def test_narration_wraps_under_its_text_within_the_width() -> None:
    from rich.console import Console

    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    Narrator(console).say("x", "word " * 40)
    lines = console.export_text().splitlines()
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith("  0 s word") and all(line.startswith("      word") for line in lines[1:]), lines
