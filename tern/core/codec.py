"""The wire codec: every payload Tern puts on MQTT or Kafka is encoded and decoded here.

One module per hop, in the order a reading travels: :mod:`tern.core.node_wire` (node ->
gateway), :mod:`tern.core.envelope` (gateway -> bridge), :mod:`tern.core.kafka_wire` (bridge ->
Kafka), over the message types of :mod:`tern.core.messages`. This module gathers them, so the
gateway (``edge``) and the bridge (``cloud``) share one codec: ``from tern.core import codec``.
docs/contracts.md describes the formats in prose; the JSON Schemas in ``tern/core/schemas``
describe the JSON ones formally. Decoders never trust their input: anything off-contract raises
:class:`CodecError` with a message fit for a dead-letter entry.
"""

from __future__ import annotations

from tern.core.envelope import (  # noqa: F401  (re-exported)
    DEADLETTERS_EXTENSION,
    DROPS_EXTENSION,
    EXTENSIONS,
    HOLDS_EXTENSION,
    MAX_DEADLETTER_PAYLOAD,
    MAX_DEADLETTER_REASON,
    MAX_DEADLETTER_TOPIC,
    MAX_DEADLETTERS_PER_BATCH,
    MAX_DROPS_PER_BATCH,
    MAX_HOLDS_PER_BATCH,
    MAX_OUTCOME_DETAIL,
    MAX_OUTCOMES_PER_BATCH,
    OUTCOMES_EXTENSION,
    decode_batch,
    decode_batch_with,
    decode_confirm,
    encode_batch,
    encode_confirm,
    gateway_dead_letter,
    reading_item_json,
)
from tern.core.errors import CodecError  # noqa: F401  (re-exported)
from tern.core.kafka_wire import (  # noqa: F401  (re-exported)
    KAFKA_DROP_SCHEMA_ID,
    KAFKA_HOLD_SCHEMA_ID,
    KAFKA_OTA_SCHEMA_ID,
    KAFKA_SCHEMA_ID,
    KAFKA_STATUS_SCHEMA_ID,
    OTA_ROLLOUT_STATES,
    ReadingRecords,
    decode_batch_records,
    decode_kafka_drop_value,
    decode_kafka_hold_value,
    decode_kafka_ota_value,
    decode_kafka_status_value,
    decode_kafka_value,
    kafka_deadletter_record,
    kafka_drop_record,
    kafka_hold_record,
    kafka_ota_record,
    kafka_outcome_record,
    kafka_record,
    kafka_status_record,
)
from tern.core.messages import (  # noqa: F401  (re-exported)
    BUNDLE_VERSION,
    DROP_REASONS,
    HOLD_REASONS,
    MAX_BATCH_BYTES,
    MAX_BATCH_INFLATED,
    MAX_BUNDLE,
    MAX_DOWN,
    MAX_DOWN_LABEL,
    MAX_DROPPED_BOOTS,
    MAX_NAME_LEN,
    MAX_NODE_PAYLOAD,
    MAX_READINGS_PER_MESSAGE,
    MAX_SAFE_INT,
    MAX_TEXT_LEN,
    OTA_STATES,
    STATES,
    WIRE_VERSION,
    Batch,
    Confirm,
    DropEvent,
    GatewayDeadLetter,
    HoldEvent,
    KafkaRecord,
    NodeAck,
    OtaReport,
    Reading,
    Status,
    StatusEvent,
    Value,
    new_reading,
)
from tern.core.node_wire import (  # noqa: F401  (re-exported)
    decode_node_ack,
    decode_reading,
    decode_readings,
    decode_status,
    encode_bundle,
    encode_node_ack,
    encode_reading,
    encode_status,
)
