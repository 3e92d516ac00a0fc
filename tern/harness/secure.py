"""A secured local site for the demo and the tests: accounts, certificates, broker configs.

Everything is made by Tern's own tools (tern.security) into one folder, as a small deployment
would: the Pi broker with per-device accounts and the ACL (anonymous off), the cloud broker on
mutual TLS with the cloud ACL (each gateway only its own topics), client certificates for the
gateway and the bridge. With ``node_tls`` the Pi broker also has a TLS listener for nodes, whose
firmware checks the broker's certificate against the site CA (``node_ca``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tern.harness.stack import BrokerTls, Mosquitto
from tern.security import pki
from tern.security.mosquitto_auth import DeviceAuth, render_cloud_acl
from tern.security.secret_files import write_private

GATEWAY_USER = "tern-gateway"
MONITOR_USER = "tern-monitor"


class SecureSite:
    """Accounts and certificates for one site, one gateway and its bridges."""

    def __init__(self, folder: Path, site: str, gateway_id: str, bridges: tuple[str, ...] = ("main",)) -> None:
        self.folder = Path(folder)
        self.site = site
        self.gateway_id = gateway_id
        self.auth = DeviceAuth(self.folder / "auth")
        self.gateway_secret = self.auth.folder / "gateway.secret"
        self._secrets: list[str] = []
        password = self.auth.set_gateway(GATEWAY_USER)
        write_private(self.gateway_secret, password + "\n")
        self.monitor_password = self.auth.set_monitor(MONITOR_USER)
        self._secrets += [password, self.monitor_password]

        self.pki = self.folder / "pki"
        ca = pki.make_ca("Tern demo CA")
        self.ca_file, ca_key = ca.write(self.pki, "ca")
        self.broker_cert, self.broker_key = pki.issue_server(ca, ["127.0.0.1", "localhost"]).write(self.pki, "broker")
        self.client_files: dict[str, tuple[Path, Path]] = {}
        for name in (gateway_id, *(bridge_user(b) for b in bridges)):
            self.client_files[name] = pki.issue_client(ca, name).write(self.pki, name)
        self.cloud_acl = self.folder / "cloud.acl"
        write_private(self.cloud_acl, render_cloud_acl([bridge_user(b) for b in bridges]))
        self._key_files = [ca_key, self.broker_key, *(key for _, key in self.client_files.values())]

    # --- brokers -----------------------------------------------------------------------------
    def pi_broker(self, workdir: Path, node_tls: bool = False) -> Mosquitto:
        """The Pi's mosquitto: per-device accounts and the ACL, anonymous access off; with
        ``node_tls`` also a TLS listener for nodes (``node_tls_address``), the broker's
        certificate issued by the site CA."""
        tls = BrokerTls(self.ca_file, self.broker_cert, self.broker_key) if node_tls else None
        return Mosquitto(workdir, auth_folder=self.auth.folder, node_tls=tls)

    @property
    def node_ca(self) -> Path:
        """The CA file a node gets as its ``tls_ca`` (``tern-device flash --ca``)."""
        return self.ca_file

    def cloud_broker(self, workdir: Path) -> Mosquitto:
        """The cloud mosquitto: mutual TLS only, clients known by certificate, the cloud ACL."""
        return Mosquitto(workdir, tls=BrokerTls(self.ca_file, self.broker_cert, self.broker_key,
                                                require_client_cert=True), acl_file=self.cloud_acl)

    # --- clients -----------------------------------------------------------------------------
    def add_node(self, device: str) -> dict[str, Any]:
        """Provision ``device``; returns the config keys its firmware needs (its password)."""
        password = self.auth.add_device(device, self.site)
        self._secrets.append(password)
        return {"mqtt_password": password}

    def gateway_settings(self) -> dict[str, Any]:
        """GatewayConfig keyword arguments for the secured brokers."""
        cert, key = self.client_files[self.gateway_id]
        return {"local_username": GATEWAY_USER, "local_password_file": str(self.gateway_secret),
                "cloud_ca": str(self.ca_file), "cloud_cert": str(cert), "cloud_key": str(key)}

    def bridge_settings(self, bridge: str = "main") -> dict[str, Any]:
        """BridgeConfig keyword arguments for the secured cloud broker."""
        cert, key = self.client_files[bridge_user(bridge)]
        return {"mqtt_ca": str(self.ca_file), "mqtt_cert": str(cert), "mqtt_key": str(key)}

    def monitor_credentials(self) -> tuple[str, str]:
        """A read-only account on the Pi broker for observers."""
        return MONITOR_USER, self.monitor_password

    def secrets(self) -> list[str]:
        """Every secret this site holds: passwords, and the body of every private key."""
        bodies = []
        for key in self._key_files:
            lines = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
            bodies += lines  # any line of a key's base64 would be a leak
        return [*self._secrets, *bodies]


def bridge_user(bridge: str) -> str:
    """The certificate name (and cloud broker username) of bridge instance ``bridge``."""
    return f"tern-bridge-{bridge}"
