"""``make bench``: Tern's speed and memory figures, each as a ratio to a baseline of the same run.

Machines are noisy (the project's have 2 cores), so no figure here is judged on its own: every
measurement runs a Tern path and a plain baseline doing the same work on the same parts, in the
same run, and reports ``ratio = tern / baseline``. For throughputs a ratio of 0.5 means Tern
moves half as many readings per second as the baseline; for the firmware's free heap it is
the share of the heap left while the firmware runs (after 3,000 acked publishes).

Benchmarks (``--only NAME``, repeatable):

``codec``     ``decode_reading`` vs ``json.loads``; batch encode+decode vs zlib+json.
``outbox``    ``Outbox.add`` in groups of 100 vs raw ``sqlite3`` executemany, same pragmas.
``gateway``   mosquitto_pub fleet -> mosquitto -> gateway process (committed) vs the same fleet
              -> mosquitto -> a plain paho subscriber process.
``bridge``    batches on the cloud broker -> BridgeThread -> Kafka (confirmed) vs aiokafka
              and vs a plain librdkafka producer (``confluent-kafka``).
``e2e``       paho node -> gateway -> bridge -> Kafka (in the bench's process) vs paho -> mosquitto
              -> paho in the same process.
``firmware``  free heap of main.py at the end of 3,000 acked publishes vs ``umqtt.simple`` alone (100K heap);
              the same run over TLS vs over plain MQTT.
``ota``       N emulated nodes updated at once behind one gateway vs one node at a time; release
              bytes over the uplink (once per gateway) vs sent per node; free heap while
              downloading vs idle.
``drain``     a backlog filled through ``Outbox.add``, drained by gateway and bridge processes
              into Kafka, vs the naive per-message bridge, raw aiokafka and librdkafka; CPU and RSS.
``live``      many node connections -> gateway -> bridge -> Kafka (processes) vs plain pub/sub
              and vs the naive bridge; bytes on the uplink per reading vs per-message JSON.
``latency``   node -> Kafka at a steady 50 % of live capacity: p50/p99/max.
``growth``    ingest and drain rates and the gateway's RSS with the outbox already holding
              0, 1M and 10M readings (built in bulk, cached), vs the same at 0.
``fleet``     1,000 node connections (aiomqtt, one device each, QoS 1 at a low rate) on one
              gateway: its CPU per reading and RSS vs the same devices on 10 connections.
``wear``      bytes the gateway writes to disk per reading (``/proc/PID/io``), at ingest and
              at drain, vs the payload's own size.
``scaleout``  1, 2, 3 bridge processes on a shared subscription, on the 3-node Apache Kafka
              cluster (Tansu loses records under concurrent producers; skipped where no
              cluster is started, as in ``--quick``).
``apache``    ``bridge`` and ``drain`` again on a 3-node Apache Kafka cluster (RF 3, min ISR 2),
              started once (by ``scaleout`` or here) and stopped after this stage: the
              ``apache.*`` rows (none in ``--quick`` unless named with ``--only apache``).

Issue 13's and 27's targets are judged on the ratios; a full run exits 1 when one is missed and writes
``docs/benchmarks.md``, ``docs/benchmark-history.md`` and the PNGs (``--docs DIR`` elsewhere).

Everything runs on loopback with the project's own runners (``tern.harness.stack``); Kafka is a private
Tansu unless ``KAFKA_BOOTSTRAP`` names one (or ``TERN_KAFKA=apache`` asks for the cluster everywhere). Every wait is bounded by a deadline. Results go to a
``rich`` table and to ``.cache/bench/latest.json``. Errors print one line and exit with 2.
"""
