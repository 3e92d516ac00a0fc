"""Per-device MQTT accounts on the gateway's mosquitto: password file, ACL, device registry.

One folder holds three files, all written owner-only:

- ``passwd``: mosquitto's own format, ``user:$7$<iterations>$<salt>$<hash>`` (PBKDF2-HMAC-SHA512,
  as ``mosquitto_passwd`` writes it; tested against mosquitto itself);
- ``acl``: generated from the registry, never edited by hand;
- ``devices.json``: which devices exist and at which site, and the gateway's account name.

The ACL gives a node exactly its own topics: publish ``tern/<site>/<id>/telemetry`` and
``.../status``, read ``.../ack``. Only the gateway's account may write any node's ack topic and
read every node topic. mosquitto reads the files at start and on SIGHUP (``systemctl reload
mosquitto``), so a removed device is locked out at its next connect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from tern.core.topics import (ack_topic, check_id, command_topic, fw_get_topic, fw_topic, reply_topic, status_topic,
                              telemetry_topic)
from tern.security.secret_files import write_private

HASH_ID = 7  # mosquitto's id for PBKDF2-HMAC-SHA512
ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12
PASSWORD_BYTES = 18  # 24 URL-safe characters


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The ``$7$...`` hash mosquitto stores for ``password``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"${HASH_ID}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash from a mosquitto password file."""
    try:
        _, kind, iterations, salt, digest = stored.split("$")
        if int(kind) != HASH_ID:
            return False
        mine = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(base64.b64encode(mine).decode(), digest)


def new_password() -> str:
    """A random password for a device or gateway account."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def read_password_file(path: Path) -> dict[str, str]:
    """``{user: hash}`` from a mosquitto password file (missing file: empty)."""
    users: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and ":" in line:
                user, _, stored = line.partition(":")
                users[user] = stored
    return users


@dataclass(frozen=True)
class Device:
    """A provisioned device."""

    device: str
    site: str
    added: float


class AuthError(ValueError):
    """A device or account operation that cannot be done (unknown device, bad id)."""


class DeviceAuth:
    """The password file, ACL and registry of one gateway's mosquitto, kept in step."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.passwd_path = self.folder / "passwd"
        self.acl_path = self.folder / "acl"
        self.registry_path = self.folder / "devices.json"

    # -- registry ---------------------------------------------------------------------------
    def _load(self) -> dict:
        if self.registry_path.exists():
            return json.loads(self.registry_path.read_text())
        return {"gateway_user": None, "devices": {}}

    def _save(self, registry: dict, hashes: dict[str, str]) -> None:
        write_private(self.passwd_path, "".join(f"{u}:{h}\n" for u, h in sorted(hashes.items())))
        write_private(self.acl_path, render_acl(registry))
        write_private(self.registry_path, json.dumps(registry, indent=2, sort_keys=True) + "\n")

    def devices(self) -> list[Device]:
        """Every provisioned device, sorted by id."""
        reg = self._load()
        return [Device(d, e["site"], e["added"]) for d, e in sorted(reg["devices"].items())]

    @property
    def gateway_user(self) -> str | None:
        """The gateway's own account, once :meth:`set_gateway` has made it."""
        return self._load()["gateway_user"]

    # -- changes ----------------------------------------------------------------------------
    def set_gateway(self, user: str, password: str | None = None) -> str:
        """Create (or re-key) the gateway's account; returns its password."""
        check_id(user, "gateway user")
        reg, hashes = self._load(), read_password_file(self.passwd_path)
        if user in reg["devices"]:
            raise AuthError(f"{user!r} is already a device; the gateway needs its own account")
        old = reg.get("gateway_user")
        if old and old != user:
            hashes.pop(old, None)
        password = password or new_password()
        reg["gateway_user"] = user
        hashes[user] = hash_password(password)
        self._save(reg, hashes)
        return password

    def add_device(self, device: str, site: str, password: str | None = None) -> str:
        """Provision ``device`` at ``site`` (or give it a new password); returns the password."""
        check_id(device, "device")
        check_id(site, "site")
        reg, hashes = self._load(), read_password_file(self.passwd_path)
        if device == reg.get("gateway_user"):
            raise AuthError(f"{device!r} is the gateway's account, not a device")
        password = password or new_password()
        reg["devices"][device] = {"site": site, "added": round(time.time(), 3)}
        hashes[device] = hash_password(password)
        self._save(reg, hashes)
        return password

    def set_monitor(self, user: str, password: str | None = None) -> str:
        """Create (or re-key) a read-only account for dashboards and tools; returns its password."""
        check_id(user, "monitor user")
        reg, hashes = self._load(), read_password_file(self.passwd_path)
        if user in reg["devices"] or user == reg.get("gateway_user"):
            raise AuthError(f"{user!r} is already an account of another kind")
        password = password or new_password()
        monitors = set(reg.get("monitors", []))
        monitors.add(user)
        reg["monitors"] = sorted(monitors)
        hashes[user] = hash_password(password)
        self._save(reg, hashes)
        return password

    def remove_device(self, device: str) -> None:
        """Remove ``device``: its account and ACL entries go; it is refused at its next connect."""
        reg, hashes = self._load(), read_password_file(self.passwd_path)
        if device not in reg["devices"]:
            raise AuthError(f"no device {device!r} (see `tern-gateway devices list`)")
        del reg["devices"][device]
        hashes.pop(device, None)
        self._save(reg, hashes)


def render_acl(registry: dict) -> str:
    """The mosquitto ACL for a registry: each node its own topics, the gateway all of them."""
    lines = ["# Generated by tern-gateway devices; edits are overwritten.", ""]
    gw = registry.get("gateway_user")
    if gw:
        lines += [f"user {gw}", "topic read tern/#", "topic write tern/+/+/ack", "topic write tern/+/+/cmd",
                  "topic write tern/+/+/fw", ""]
    for monitor in registry.get("monitors", []):
        lines += [f"user {monitor}", "topic read tern/#", ""]
    for device, entry in sorted(registry["devices"].items()):
        site = entry["site"]
        lines += [
            f"user {device}",
            f"topic write {telemetry_topic(site, device)}",
            f"topic write {status_topic(site, device)}",
            f"topic read {ack_topic(site, device)}",
            f"topic read {command_topic(site, device)}",
            f"topic write {reply_topic(site, device)}",
            f"topic write {fw_get_topic(site, device)}",
            f"topic read {fw_topic(site, device)}",
            "",
        ]
    return "\n".join(lines)


def mosquitto_conf(folder: Path) -> str:
    """The mosquitto.conf lines that turn these files on (anonymous access off)."""
    auth = DeviceAuth(folder)
    return "\n".join([
        "allow_anonymous false",
        f"password_file {auth.passwd_path}",
        f"acl_file {auth.acl_path}",
        # A node's client id is its device id: another node's id is refused, not a session takeover.
        "use_username_as_clientid true",
    ]) + "\n"


def render_cloud_acl(bridge_users: list[str]) -> str:
    """The cloud broker's ACL: each gateway only its own ``tern-gw/<gw>/...``, bridges all.

    Gateways may read the bridges' status (their birth and last will), not write it.
    A gateway's username is its id: the common name of its client certificate
    (``use_identity_as_username``) or its password-file account.
    """
    lines = ["# Tern cloud broker ACL. A gateway may publish only its own batches and read only",
             "# its own confirms; the bridge accounts read every batch and confirm any.", "",
             "pattern write tern-gw/%u/batch", "pattern read tern-gw/%u/confirm",
             "pattern read tern-gw/%u/cmd", "pattern read tern-gw/%u/release",
             "pattern read tern-bridge/+/status", ""]
    for user in bridge_users:
        check_id(user, "bridge user")
        lines += [f"user {user}", "topic read tern-gw/+/batch", "topic write tern-gw/+/confirm",
                  "topic write tern-gw/+/cmd", "topic write tern-gw/+/release", "topic readwrite tern-bridge/+/status", ""]
    return "\n".join(lines)
