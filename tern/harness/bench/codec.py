"""Stage 1, codec: ``decode_reading`` vs ``json.loads``; batch encode+decode vs zlib+json."""

from __future__ import annotations

import json
import zlib
from typing import Any

from tern.core import codec
from tern.core.codec import Batch
from tern.harness.bench.common import (
    BATCH_READINGS,
    DEVICES,
    SITE,
    Measurement,
    Sizes,
    best_of_interleaved,
    rate,
    sample_batches,
    telemetry_messages,
)
from tern.harness.bench.lab import Lab


def bench_codec(lab: Lab) -> list[Measurement]:
    """decode_reading vs json.loads; batch encode+decode vs zlib+json."""
    return [bench_decode_reading(lab.sizes), bench_batch_roundtrip(lab.sizes)]


def bench_decode_reading(sizes: Sizes) -> Measurement:
    """Node readings decoded per second by the codec vs plain json.loads of the same bytes."""
    payloads = [payload for _, payload in telemetry_messages(DEVICES * 10)]
    loops = max(1, sizes.decode_loops // len(payloads))
    count = loops * len(payloads)

    def tern() -> None:
        decode = codec.decode_reading
        for _ in range(loops):
            for payload in payloads:
                decode(payload, site=SITE)

    def base() -> None:
        loads = json.loads
        for _ in range(loops):
            for payload in payloads:
                loads(payload)

    tern_s, base_s = best_of_interleaved(tern, base, sizes.repeats)
    return Measurement(
        name="codec.decode_reading", benchmark="codec", unit="readings/s",
        figure=rate(count, tern_s), baseline=rate(count, base_s),
        what="codec.decode_reading (parse + validate)", baseline_what="json.loads of the same bytes",
        count=count, details={"payload_bytes": len(payloads[0]), "repeats": sizes.repeats},
    )


def batch_document(batch: Batch) -> dict[str, Any]:
    """The envelope as a plain dict, for the baseline (same content as codec.encode_batch)."""
    return {
        "v": 1, "gw": batch.gateway, "bseq": batch.bseq, "sent": batch.sent_ms,
        "items": [
            {"site": r.site, "dev": r.device, "boot": r.boot, "seq": r.seq, "ts": r.ts_ms, "rx": r.received_ms, "r": dict(r.values)}
            for r in batch.readings
        ],
    }


def bench_batch_roundtrip(sizes: Sizes) -> Measurement:
    """Batches of 200 readings encoded and decoded per second vs zlib(json) both ways."""
    batch = sample_batches("bench-gw", 1)[0]
    doc = batch_document(batch)
    loops = sizes.batch_loops

    def tern() -> None:
        for _ in range(loops):
            codec.decode_batch(codec.encode_batch(batch))

    def base() -> None:
        for _ in range(loops):
            json.loads(zlib.decompress(zlib.compress(json.dumps(doc).encode())))

    tern_s, base_s = best_of_interleaved(tern, base, sizes.repeats)
    return Measurement(
        name="codec.batch_roundtrip", benchmark="codec", unit="readings/s",
        figure=rate(loops * BATCH_READINGS, tern_s), baseline=rate(loops * BATCH_READINGS, base_s),
        what=f"encode_batch + decode_batch, {BATCH_READINGS} readings",
        baseline_what="zlib.compress(json.dumps) + json.loads(zlib.decompress)",
        count=loops * BATCH_READINGS,
        details={"batch_bytes": len(codec.encode_batch(batch)), "repeats": sizes.repeats},
    )
