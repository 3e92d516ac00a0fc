"""``tern-gateway devices`` and ``tern-gateway certs``: who may talk to the gateway's brokers.

    tern-gateway devices init --gateway-user tern-gateway   # the gateway's own account
    tern-gateway devices add node-7 --site greenhouse --config-out node-7.json
    tern-gateway devices list
    tern-gateway devices remove node-7 --pid-file /run/mosquitto/mosquitto.pid
    tern-gateway certs --out /etc/tern/pki --broker-host cloud.example --gateway pi-gw-1

Passwords are never printed: a device's goes into the config file it will be flashed with, the
gateway's into ``gateway.secret`` beside the password file, both mode 0600.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from tern.core.errors import CodecError, ConfigError
from tern.core.topics import check_id
from tern.security import pki
from tern.security.mosquitto_auth import AuthError, DeviceAuth
from tern.security.secret_files import exposure_warning, write_private

ENV_AUTH_DIR = "TERN_AUTH_DIR"
DEFAULT_AUTH_DIR = "/etc/mosquitto/tern"
GATEWAY_SECRET = "gateway.secret"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``devices`` and ``certs`` subcommands to ``tern-gateway``."""
    devices = sub.add_parser("devices", help="per-device MQTT accounts on the gateway's mosquitto")
    devices.add_argument("--auth-dir", default=os.environ.get(ENV_AUTH_DIR, DEFAULT_AUTH_DIR),
                         help=f"folder of the password file, ACL and registry (env {ENV_AUTH_DIR}; "
                              f"default {DEFAULT_AUTH_DIR})")
    devices.add_argument("--pid-file", help="mosquitto's pid file: send it SIGHUP so a change applies at once")
    action = devices.add_subparsers(dest="devices_command", required=True)
    init = action.add_parser("init", help="create the gateway's own account (reads every node, writes acks)")
    init.add_argument("--gateway-user", default="tern-gateway")
    add = action.add_parser("add", help="provision a device: random password, password file and ACL")
    add.add_argument("device")
    add.add_argument("--site", required=True)
    add.add_argument("--config-out", help="write the device's config.json here with its password "
                                          "(from --config-in or an empty one)")
    add.add_argument("--config-in", help="base config.json to add the credentials to")
    action.add_parser("list", help="list provisioned devices")
    remove = action.add_parser("remove", help="remove a device: refused at its next connect")
    remove.add_argument("device")

    certs = sub.add_parser("certs", help="make a site CA, a cloud broker certificate and gateway client certificates")
    certs.add_argument("--out", required=True, help="folder for ca.crt/ca.key, broker.crt/key, <gateway>.crt/key")
    certs.add_argument("--broker-host", action="append", default=[],
                       help="DNS name or IP the cloud broker is reached at (repeatable)")
    certs.add_argument("--gateway", action="append", default=[], help="gateway id to issue a client certificate for (repeatable)")
    certs.add_argument("--client", action="append", default=[], help="other client (e.g. the bridge) to issue a certificate for")


def run(args: argparse.Namespace) -> int:
    """Run ``devices`` or ``certs``; a problem raises ConfigError (one line, exit 2)."""
    if args.command == "certs":
        return _certs(args)
    auth = DeviceAuth(Path(args.auth_dir))
    for path in (auth.passwd_path, auth.registry_path, auth.folder / GATEWAY_SECRET):
        warning = exposure_warning(path)
        if warning:
            print(warning)
    try:
        if args.devices_command == "list":
            return _list(auth)
        if args.devices_command == "init":
            password = auth.set_gateway(args.gateway_user)
            write_private(auth.folder / GATEWAY_SECRET, password + "\n")
            print(f"gateway account {args.gateway_user!r}: password in {auth.folder / GATEWAY_SECRET}")
        elif args.devices_command == "add":
            _add(auth, args)
        else:
            auth.remove_device(args.device)
            print(f"removed {args.device}")
    except (AuthError, CodecError) as exc:
        raise ConfigError(str(exc)) from None
    _apply(auth, args.pid_file)
    return 0


def _list(auth: DeviceAuth) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"devices in {auth.folder} (gateway account: {auth.gateway_user or '-'})")
    for column in ("device", "site", "added"):
        table.add_column(column)
    for d in auth.devices():
        table.add_row(d.device, d.site, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.added)))
    Console().print(table)
    return 0


def _add(auth: DeviceAuth, args: argparse.Namespace) -> None:
    base: dict = {}
    if args.config_in:
        try:
            base = json.loads(Path(args.config_in).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--config-in {args.config_in}: {exc}") from None
    password = auth.add_device(args.device, args.site)
    if args.config_out:
        base.update({"device": args.device, "site": args.site, "mqtt_password": password})
        write_private(Path(args.config_out), json.dumps(base, indent=2) + "\n")
        print(f"added {args.device} at {args.site}: credentials in {args.config_out}")
    else:
        print(f"added {args.device} at {args.site}; no --config-out given, so give it a password "
              f"with `tern-device flash --auth-dir {auth.folder}` or add it again with --config-out")


def _apply(auth: DeviceAuth, pid_file: str | None) -> None:
    if not pid_file:
        print("apply with: systemctl reload mosquitto (mosquitto re-reads the password file and ACL)")
        return
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot signal mosquitto from {pid_file}: {exc}") from None
    print(f"mosquitto (pid {pid}) reloaded its password file and ACL")


def _certs(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "ca.crt").exists():
        ca = pki.load(out, "ca")
        print(f"using the existing CA in {out}")
    else:
        ca = pki.make_ca()
        ca.write(out, "ca")
        print(f"made a site CA: {out / 'ca.crt'} (its key {out / 'ca.key'} is mode 0600: keep it offline)")
    if args.broker_host:
        pki.issue_server(ca, args.broker_host).write(out, "broker")
        print(f"broker certificate for {', '.join(args.broker_host)}: {out / 'broker.crt'}")
    for name in [*args.gateway, *args.client]:
        try:
            check_id(name, "client name")
        except CodecError as exc:
            raise ConfigError(str(exc)) from None
        pki.issue_client(ca, name).write(out, name)
        print(f"client certificate for {name}: {out / (name + '.crt')}")
    return 0
