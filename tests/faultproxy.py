"""The tests' fault proxy: it lives in the harness (``make demo`` cuts its uplink with it)."""

from tern.harness.faultproxy import MODES, FaultProxy

__all__ = ["MODES", "FaultProxy"]
