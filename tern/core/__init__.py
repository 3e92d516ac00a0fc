"""Tern's wire core: what every hop shares and nothing above it may change.

- :mod:`tern.core.codec`: the one codec of node payloads, batch envelopes, confirms and Kafka
  records (edge and cloud both use it); JSON Schemas of the formats in ``schemas/``;
- :mod:`tern.core.topics`: MQTT topic names and id rules;
- :mod:`tern.core.mqtt_session`: the persistent paho session the gateway and bridge run on;
- :mod:`tern.core.hostport`: ``HOST:PORT`` parsing for every config;
- :mod:`tern.core.errors`: the exception types.

This package imports nothing from the rest of Tern (enforced by import-linter, see
``pyproject.toml``).
"""
