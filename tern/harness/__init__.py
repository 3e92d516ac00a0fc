"""The lab around the product: local brokers, the demo, observers and ``make bench``.

- :mod:`tern.harness.stack`: private mosquitto and Tansu processes on loopback ports;
- :mod:`tern.harness.observe`: watches brokers and Kafka and reconciles what arrived;
- :mod:`tern.harness.demo`: ``make demo``, the whole path on embedded defaults;
- :mod:`tern.harness.bench`: ``make bench``, one module per stage measured.

The harness may import everything below it; nothing in the product imports the harness.
"""
