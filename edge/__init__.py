"""Tern's edge gateway: takes custody of node readings on the Pi and forwards them to the cloud.

The custody rule: a hop deletes a reading only after the next durable store has confirmed it.

- :mod:`tern.edge.ingest` commits each reading to the SQLite outbox *before* it PUBACKs the node's
  message on the local broker, then tells the node (``.../ack``);
- :mod:`tern.edge.uplink` deletes outbox rows only after the bridge confirms their batch is in Kafka;
- :mod:`tern.edge.outbox` is the durable store between the two (bounded: when full, ingest stops
  acking and the broker's persistent session and the nodes' rings hold the rest);
- :mod:`tern.edge.service` wires them together (:class:`tern.edge.service.Gateway`), :mod:`tern.edge.cli` is
  ``tern-gateway``, :mod:`tern.edge.config` validates the settings both use.
"""
