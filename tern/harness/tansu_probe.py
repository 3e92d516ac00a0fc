"""Does Tansu keep every record that concurrent producers wrote and it acknowledged?

Tests and the bench saw Tansu (memory storage) lose a few acknowledged records when several
bridges wrote the same partitions at once, never with one bridge. This probe takes the bridge
out of the question: plain aiokafka producers (``acks=all``) on a fresh Tansu, each awaiting
every send, then one consumer reads the topic back and names what is missing.

    python -m tern.harness.tansu_probe --rounds 40 --producers 3

Exit status 1 when any acknowledged record was missing in any round.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

TOPIC = "probe"
PARTITIONS = 3


async def _round(bootstrap: str, producers: int, per_producer: int) -> set[bytes]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()

    async def produce(index: int) -> set[bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        acked: set[bytes] = set()
        try:
            for n in range(per_producer):
                value = b"p%d-%d" % (index, n)
                await (await producer.send(TOPIC, value, key=b"dev-%02d" % (n % 8)))
                acked.add(value)
        finally:
            await producer.stop()
        return acked

    acked = set().union(*await asyncio.gather(*(produce(i) for i in range(producers))))
    consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    seen: set[bytes] = set()
    try:
        deadline = time.monotonic() + 15
        while not acked <= seen and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                seen.update(record.value for record in records)
    finally:
        await consumer.stop()
    return acked - seen


def main(argv: list[str] | None = None) -> int:
    """Run the probe; print one line per round with a loss and a summary; 1 if any was lost."""
    from tern.harness.stack import Tansu

    parser = argparse.ArgumentParser(prog="python -m tern.harness.tansu_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--per-producer", type=int, default=50)
    args = parser.parse_args(argv)
    lossy = 0
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory() as workdir:
            tansu = Tansu(Path(workdir)).start()
            try:
                missing = asyncio.run(_round(tansu.bootstrap, args.producers, args.per_producer))
            finally:
                tansu.close()
        if missing:
            lossy += 1
            print(f"round {index + 1}: {len(missing)} acknowledged record(s) missing: "
                  f"{', '.join(sorted(v.decode() for v in missing))}")
    total = args.producers * args.per_producer
    print(f"{lossy} of {args.rounds} rounds lost acknowledged records "
          f"({args.producers} producers x {args.per_producer} records, {PARTITIONS} partitions, acks=all)")
    return 1 if lossy else 0


if __name__ == "__main__":
    sys.exit(main())
