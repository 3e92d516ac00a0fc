"""Node TLS: the real firmware on the emulated board (100 KB heap) publishes through the Pi
broker's TLS listener, checking the broker's certificate against the site CA on its flash; the
gateway commits its readings and acks them. A node given another CA is refused, says why on its
console, keeps backing off (no crash loop), and nothing of it is committed.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tern.device.emulate import DEFAULT_HEAP, EmulatedNode
from tern.edge.service import Gateway
from tern.harness.secure import GATEWAY_USER, SecureSite
from tern.harness.stack import Mosquitto
from tern.security import pki

from helpers import DEADLINE, GW, SITE, config, outbox_rows, run_mp, wait_until

READINGS = 20


def _node(tmp: Path, site: SecureSite, pi: Mosquitto, device: str, ca: Path) -> EmulatedNode:
    """A provisioned node (its own account) on the broker's TLS listener, with ``ca`` as its tls_ca."""
    return EmulatedNode(tmp / device, device=device, site=SITE, broker=pi.node_tls_address, interval_ms=50,
                        max_readings=READINGS, ca_file=ca, extra_config=site.add_node(device))


def test_node_publishes_over_tls_and_a_wrong_ca_is_refused(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    site = SecureSite(tmp_path / "site", SITE, GW)
    rogue_ca, _ = pki.make_ca("Not the site CA").write(tmp_path / "rogue-pki", "ca")
    outbox = tmp_path / "gw" / "outbox.db"
    with ExitStack() as stack:
        pi = site.pi_broker(tmp_path / "pi", node_tls=True).start()
        stack.callback(pi.stop)
        good = _node(tmp_path, site, pi, "node-1", site.node_ca)
        wrong = _node(tmp_path, site, pi, "node-2", rogue_ca)
        pi.reload()  # mosquitto re-reads the accounts add_node made
        # The gateway on the plain loopback listener, as on the Pi.
        gateway = stack.enter_context(Gateway(config(pi, mosquitto_factory("cloud"), outbox, local_username=GATEWAY_USER,
                                                     local_password_file=str(site.gateway_secret))))
        assert gateway.wait_connected(DEADLINE)
        for node in (good, wrong):
            stack.callback(node.stop)
            node.start()

        wait_until(lambda: good.wait_done(0) and good.acked >= READINGS, 60, "node-1's readings acked over TLS")
        assert [r for r in outbox_rows(outbox) if r[0] == "node-1"] == [("node-1", good.boot, s) for s in range(1, READINGS + 1)]
        assert good.boots == 1 and good.heap == DEFAULT_HEAP
        assert "MemoryError" not in good.log_text() and not good.errors, list(good.errors)

        # The wrong CA: the handshake fails on the broker's certificate, one clear line per try.
        wait_until(lambda: wrong.log_text().count("broker certificate refused") >= 2, 30, "node-2's refusals", interval=0.2)
        line = next(ln for ln in wrong.log_text().splitlines() if "broker certificate refused" in ln)
        assert line.startswith("TERN error connect") and "not correctly signed by the trusted CA" in line \
            and "check tls_ca" in line, line
        assert wrong.running and wrong.boots == 1 and wrong.resets == 0 and wrong.connects == 0
        assert "Traceback" not in wrong.log_text()
        assert not [r for r in outbox_rows(outbox) if r[0] == "node-2"]


def test_ca_file_forms_on_the_board(tmp_path: Path) -> None:
    """tern_tls on the unix port: a PEM file of two CAs gives both as DER (MicroPython's mbedtls
    parses DER only), a DER file is taken as is, and an unusable file is one OSError naming it."""
    first, second = pki.make_ca("CA one"), pki.make_ca("CA two")
    (tmp_path / "two.pem").write_bytes(b"# site CAs\n" + first.cert_pem + second.cert_pem.replace(b"\n", b"\r\n"))
    der = x509.load_pem_x509_certificate(first.cert_pem).public_bytes(serialization.Encoding.DER)
    (tmp_path / "one.der").write_bytes(der)
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    result = run_mp(tmp_path, """\
import json, tern_tls
out = {}
for name in ("two.pem", "one.der"):
    with open(name, "rb") as f:
        out[name] = [c.hex() for c in tern_tls.ca_certs(f.read())]
    tern_tls.context(name)
for name in ("junk.pem", "missing.pem"):
    try:
        tern_tls.context(name)
    except OSError as e:
        out[name] = str(e)
print(json.dumps(out))
""")
    pems = [first.cert_pem, second.cert_pem]
    assert result["two.pem"] == [x509.load_pem_x509_certificate(p).public_bytes(serialization.Encoding.DER).hex() for p in pems]
    assert result["one.der"] == [der.hex()]
    assert result["junk.pem"].startswith("tls_ca junk.pem: ValueError"), result["junk.pem"]
    assert result["missing.pem"].startswith("tls_ca missing.pem: OSError"), result["missing.pem"]
