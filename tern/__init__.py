"""Tern: sensor readings from MicroPython nodes over MQTT to Kafka, without losing any.

One package, layered (import-linter holds it, see ``pyproject.toml``):

- :mod:`tern.core`: the wire core every hop shares (codec, topics, schemas, MQTT session);
- :mod:`tern.toolchain`: finds and installs the real parts Tern runs against;
- :mod:`tern.device`, :mod:`tern.edge`, :mod:`tern.cloud`: the products (device tools, the
  Pi gateway, the cloud bridge), independent of each other;
- :mod:`tern.harness`: the lab around them (local brokers, demo, benchmarks).
"""

__version__ = "0.1.0"
