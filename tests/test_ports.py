"""Parallel test workers each take loopback ports from a block of their own (TERN_PORT_BLOCK)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tern.harness.stack import PORT_BLOCK_ENV, ServiceError, free_port


def test_ports_of_one_block_are_handed_out_once_across_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_BLOCK_ENV, "29000-29099")
    mine = [free_port() for _ in range(5)]
    code = "from tern.harness.stack import free_port; print(*[free_port() for _ in range(5)])"
    theirs = [int(p) for p in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True, timeout=60).stdout.split()]
    ports = mine + theirs
    assert len(set(ports)) == 10 and all(29000 <= p <= 29099 for p in ports)


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_BLOCK_ENV, "29100-29109")
    first = free_port()
    with socket.socket() as busy:
        following = 29100 + (first - 29100 + 1) % 10
        busy.bind(("127.0.0.1", following))
        busy.listen()
        assert free_port() not in (first, following)


@pytest.mark.parametrize("block", ["20000", "a-b", "30000-20000", "80-90"])
def test_a_bad_block_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, block: str) -> None:
    monkeypatch.setenv(PORT_BLOCK_ENV, block)
    with pytest.raises(ServiceError, match=PORT_BLOCK_ENV):
        free_port()
