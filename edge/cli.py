"""``tern-gateway``: run the gateway, check a site's setup, or look into an outbox.

    tern-gateway run --config /etc/tern/gateway.toml
    tern-gateway run --gateway-id gw1 --local 127.0.0.1:1883 --cloud 127.0.0.1:1884 \\
        --outbox /var/lib/tern/outbox.db [--batch-size N]
    tern-gateway check --config /etc/tern/gateway.toml [--repair]
    tern-gateway outbox --outbox /var/lib/tern/outbox.db
    tern-gateway status --config /etc/tern/gateway.toml

Every setting is a key of the TOML ``--config`` file, a ``TERN_*`` environment variable and a
flag; flags win over the environment, which wins over the file (see deploy/gateway.toml).

Exit codes: 0 fine; 2 the setup is wrong (a config error, a failed check, a damaged outbox):
one line says what and where, never a traceback. The unit in deploy/ does not restart the
service on 2 (RestartPreventExitStatus=2): retrying cannot fix a setup, only a person can.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from typing import Sequence

from tern.core import quoting
from tern.edge import accounts, status_cli
from tern.edge.config import GatewayConfig
from tern.edge.config_file import add_flags
from tern.edge.outbox import now_ms, open_readonly, summarize
from tern.core.errors import ConfigError
from tern.security import redact
from tern.tables import Column, print_fitted

PROG = "tern-gateway"
#: Exit code of a setup a person must fix (config, damaged outbox, failed check).
EXIT_SETUP = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Tern edge gateway: local MQTT -> SQLite outbox -> cloud MQTT.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway until SIGINT/SIGTERM")
    run.add_argument("--config", help="TOML config file (keys as in deploy/gateway.toml)")
    add_flags(run)

    check = sub.add_parser("check", help="validate the config, reach both brokers, check the outbox folder and file")
    check.add_argument("--config", help="TOML config file (keys as in deploy/gateway.toml)")
    check.add_argument("--repair", action="store_true", help="salvage a damaged outbox into a fresh one (gateway stopped!)")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each broker (default 5)")
    add_flags(check)

    show = sub.add_parser("outbox", help="print pending readings per device, pending status events and dead letters")
    show.add_argument("--outbox", required=True, help="SQLite outbox file")
    show.add_argument("--format", choices=("table", "json"), default="table",
                      help="table for people (default), or one JSON document for scripts")
    accounts.add_parsers(sub)
    status_cli.add_parser(sub)
    return parser


def _config_hint(args: argparse.Namespace) -> str:
    return f" --config {args.config}" if getattr(args, "config", None) else ""


def cmd_run(args: argparse.Namespace) -> int:
    """``tern-gateway run``."""
    from tern.edge import repair
    from tern.edge.service import Gateway

    config = GatewayConfig.from_args(args)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Whatever path a secret takes into a log line (an exception text, a URL), it is masked.
    redact.install(config.secrets())
    # Untrusted input (topics, payloads) never makes a line longer than a few KB.
    quoting.bound_log_lines()
    # A damaged outbox must stop the service with one line, not crash-loop it.
    problem = repair.inspect(config.outbox_path)
    if problem is not None:
        raise ConfigError(
            f"outbox {config.outbox_path} is damaged ({problem}): stop the service and run "
            f"`{PROG} check{_config_hint(args)} --repair`, which keeps the damaged file aside and "
            "salvages every readable row into a fresh outbox"
        )
    try:
        gateway = Gateway(config)
    except (OSError, sqlite3.DatabaseError) as exc:
        # An unwritable path or a file that is not SQLite: a setup error, not a crash.
        raise ConfigError(f"cannot open outbox {config.outbox_path}: {exc}") from None
    gateway.run_forever()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """``tern-gateway check``: one line per check; exit 0 when all pass, else 2."""
    from tern.edge import repair
    from tern.edge.check import run_checks

    try:
        config = GatewayConfig.from_args(args)
    except ConfigError as exc:
        print(f"FAIL config: {exc}")
        return EXIT_SETUP
    where = f"{args.config}" if args.config else "flags and environment (no --config file)"
    print(f"ok   config: {where}: gateway {config.gateway_id}, outbox {config.outbox_path}")
    if args.repair:
        problem = repair.inspect(config.outbox_path)
        if problem is None:
            print(f"ok   repair: {config.outbox_path} is not damaged; nothing to repair")
        else:
            from tern.edge.outbox_lock import OutboxLock, OutboxLocked

            try:
                # Never under a running gateway: it would go on writing to the file set aside.
                lock = OutboxLock(config.outbox_path).acquire()
            except OutboxLocked as exc:
                print(f"FAIL repair: {exc}")
                return EXIT_SETUP
            try:
                report = repair.repair(config.outbox_path)
            except (OSError, sqlite3.Error) as exc:
                print(f"FAIL repair: {config.outbox_path}: {exc}")
                return EXIT_SETUP
            finally:
                lock.release()
            print(f"ok   repair: {report.summary()}")
    results = run_checks(config, _config_hint(args), timeout=args.timeout)
    for result in results:
        print(result.line())
    return 0 if all(r.ok for r in results) else EXIT_SETUP


def cmd_outbox(args: argparse.Namespace) -> int:
    """``tern-gateway outbox``: a rich table from the same summary the library exposes."""
    from rich.console import Console

    try:
        db = open_readonly(args.outbox)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    try:
        summary = summarize(db)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{args.outbox} is not a readable outbox: {exc}") from None
    finally:
        db.close()
    now = now_ms()
    age = summary.oldest_pending_age_s(now)
    if args.format == "json":
        doc = {
            "outbox": args.outbox, "pending": summary.pending, "status_pending": summary.status_pending,
            "dead_letters": summary.dead_letters, "dead_letters_unsent": summary.dead_letters_unsent,
            "oldest_pending_age_s": age, "last_bseq": summary.last_bseq,
            "dropped": summary.dropped,
            "devices": [dict(d, oldest_age_s=max(0, now - d["oldest_ms"]) / 1000) for d in summary.devices],
        }
        print(json.dumps(doc, indent=2))
        return 0
    rows = [
        [d["device"], str(d["pending"]), str(d["first_seq"]), str(d["last_seq"]),
         f"{max(0, now - d['oldest_ms']) / 1000:.1f}", d["site"]]
        for d in summary.devices
    ]
    console = Console()
    print_fitted(console, OUTBOX_COLUMNS, rows, title=f"outbox {args.outbox}", title_justify="left")
    console.print(
        f"pending: {summary.pending}  status events pending: {summary.status_pending}  dead letters: {summary.dead_letters}"
        # Kept on the Pi after forwarding: say how many the cloud does not have yet.
        f" ({summary.dead_letters_unsent} not yet in the cloud)  "
        f"oldest pending: {'-' if age is None else f'{age:.1f} s'}  last bseq: {summary.last_bseq}"
    )
    return 0


#: `tern-gateway outbox`'s columns; the site gives way first on a narrow terminal.
OUTBOX_COLUMNS = (
    Column("device"), Column("pending", justify="right"), Column("first seq", 2, "right"),
    Column("last seq", 1, "right"), Column("oldest age (s)", 3, "right"), Column("site", 4),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tern-gateway``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "status":
            return status_cli.run(args)
        if args.command in ("devices", "certs"):
            return accounts.run(args)
        return cmd_outbox(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())
