"""``tern-gateway``: run the gateway, or look into an outbox.

    tern-gateway run --gateway-id gw1 --local 127.0.0.1:1883 --cloud 127.0.0.1:1884 \\
        --outbox /var/lib/tern/outbox.db [--batch-size N]
    tern-gateway outbox --outbox /var/lib/tern/outbox.db

Flags fall back to TERN_GATEWAY_ID, TERN_LOCAL_BROKER, TERN_CLOUD_BROKER, TERN_OUTBOX.
Configuration errors print one line and exit 2; the library (:mod:`tern.edge.service`,
:mod:`tern.edge.outbox`) does all the work.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from typing import Sequence

from tern.edge import accounts
from tern.edge.config import GatewayConfig
from tern.edge.outbox import now_ms, open_readonly, summarize
from tern.core.errors import ConfigError

PROG = "tern-gateway"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Tern edge gateway: local MQTT -> SQLite outbox -> cloud MQTT.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway until SIGINT/SIGTERM")
    run.add_argument("--gateway-id", help="this gateway's id (env TERN_GATEWAY_ID)")
    run.add_argument("--local", help="local broker HOST:PORT (env TERN_LOCAL_BROKER, default 127.0.0.1:1883)")
    run.add_argument("--cloud", help="cloud broker HOST:PORT (env TERN_CLOUD_BROKER)")
    run.add_argument("--outbox", help="SQLite outbox file (env TERN_OUTBOX)")
    run.add_argument("--batch-size", type=int, help="readings per batch (default 200)")
    run.add_argument("--max-rows", type=int, help="outbox bound; when full, ingest stops acking (default 5000000)")
    run.add_argument("--confirm-timeout", type=float, help="seconds to wait for a batch confirm before re-sending (default 15)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    show = sub.add_parser("outbox", help="print pending readings per device, pending status events and dead letters")
    show.add_argument("--outbox", required=True, help="SQLite outbox file")
    accounts.add_parsers(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """``tern-gateway run``."""
    from tern.edge.service import Gateway

    config = GatewayConfig.from_args(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        gateway = Gateway(config)
    except (OSError, sqlite3.DatabaseError) as exc:
        # An unwritable path or a file that is not SQLite: a setup error, not a crash.
        raise ConfigError(f"cannot open outbox {config.outbox_path}: {exc}") from None
    gateway.run_forever()
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    """``tern-gateway outbox``: a rich table from the same summary the library exposes."""
    from rich.console import Console
    from rich.table import Table

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
    table = Table(title=f"outbox {args.outbox}")
    for column in ("site", "device", "pending", "first seq", "last seq", "oldest age (s)"):
        table.add_column(column, justify="right" if column not in ("site", "device") else "left")
    for d in summary.devices:
        table.add_row(
            d["site"], d["device"], str(d["pending"]), str(d["first_seq"]), str(d["last_seq"]),
            f"{max(0, now - d['oldest_ms']) / 1000:.1f}",
        )
    console = Console()
    console.print(table)
    age = summary.oldest_pending_age_s(now)
    console.print(
        f"pending: {summary.pending}  status events pending: {summary.status_pending}  dead letters: {summary.dead_letters}  "
        f"oldest pending: {'-' if age is None else f'{age:.1f} s'}  last bseq: {summary.last_bseq}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tern-gateway``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command in ("devices", "certs"):
            return accounts.run(args)
        return cmd_outbox(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
