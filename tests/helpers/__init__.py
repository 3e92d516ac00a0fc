"""What the test modules share, by role (a test module imports from here or gets fixtures from
conftest.py, never from another test module):

- :mod:`.waiting`: bounded waits on real outcomes.
- :mod:`.gateway`: the gateway from outside — paho nodes, the bridge's side of the batch/confirm
  contract, the outbox read back, an in-process gateway started on two brokers.
- :mod:`.observe`: a running gateway or bridge watched over MQTT and HTTP (/status.json, /metrics).
- :mod:`.kafka`: bridge configs, records produced and read back, a stand-in for the gateway's
  cloud side, Tansu behind a fault proxy.
- :mod:`.logs`: log records caught while a test runs.
- :mod:`.processes`: real bridge and gateway processes, MicroPython scripts on the unix port.
"""

from .gateway import (
    BOOT, DEADLINE, GW, SITE, BridgeStub, Node, StatusNode, config, dead_letters, new_client, outbox_rows,
    per_device, started_gateway, status_rows,
)
from .kafka import (
    BATCH_BOOT, FakeGateway, ProxiedTansu, bridge_config, committed, kafka_seqs, kafka_statuses, make_batch, produce,
)
from .logs import log_handler
from .observe import (
    bridge, client, gateway_config, http_get, http_status, parse_metrics, publish_acked, publish_all, reading, scrape,
    scrape_url, status, status_json, value, wait_for,
)
from .processes import BridgeProcess, Proc, require_toolchain, run_mp
from .waiting import poll_until, wait_until

__all__ = [
    "BATCH_BOOT", "BOOT", "DEADLINE", "GW", "SITE", "BridgeProcess", "BridgeStub", "FakeGateway", "Node", "Proc",
    "ProxiedTansu", "StatusNode", "bridge", "bridge_config", "client", "committed", "config", "dead_letters",
    "gateway_config", "http_get", "http_status", "kafka_seqs", "kafka_statuses", "log_handler", "make_batch", "new_client",
    "outbox_rows", "parse_metrics", "per_device", "poll_until", "produce", "publish_acked", "publish_all", "reading", "require_toolchain", "run_mp",
    "scrape", "scrape_url", "started_gateway", "status", "status_json", "status_rows", "value", "wait_for",
    "wait_until",
]
