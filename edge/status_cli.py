"""``tern-gateway status``: the site on one screen (rich), while the service runs or not.

Two sources, both read-only:

- the running service's ``/status.json`` (``http_host:http_port`` from the config, or
  ``--url``): connections, counters, drain rate, time to empty, devices with firmware and
  last reading;
- the outbox file itself: what is waiting per device and each device's latest status
  (birth or last will). It answers even when the service is stopped or its endpoint is off.

When the service cannot be reached, one line says so and why, and the screen shows what the
outbox file holds. Exit codes: 0 the service answered; 1 it did not (the file was shown);
2 neither could be read (or the config is wrong).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tern.core.errors import ConfigError
from tern.edge.config import GatewayConfig
from tern.edge.command_store import pending_commands
from tern.edge.config_file import add_flags
from tern.edge.health import file_bytes, read_node_rows
from tern.edge.outbox import OutboxSummary, now_ms, open_readonly, summarize
from tern.tables import Column, fitted_table

EXIT_OK, EXIT_UNREACHABLE, EXIT_SETUP = 0, 1, 2
#: Device rows on the screen unless --all: offline devices first, so none is hidden.
DEVICE_ROWS = 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``status`` subcommand."""
    status = sub.add_parser("status", help="the gateway on one screen: devices, outbox, uplink (read-only)")
    status.add_argument("--config", help="TOML config file (keys as in deploy/gateway.toml)")
    status.add_argument("--url", help="base URL of the gateway's HTTP endpoint (default: from http_host/http_port)")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the service (default 3)")
    status.add_argument("--all", action="store_true", help=f"list every device (default: {DEVICE_ROWS}, offline ones first)")
    status.add_argument("--format", choices=("table", "json"), default="table",
                        help="table for people (default), or one JSON document for scripts")
    add_flags(status)


@dataclass
class Sources:
    """What could be read, and why not where not."""

    gateway_id: str | None = None
    url: str | None = None
    live: dict | None = None
    live_error: str | None = None
    outbox_path: str | None = None
    summary: OutboxSummary | None = None
    nodes: list[dict] = field(default_factory=list)
    outbox_error: str | None = None
    #: Unfinished commands per device, from the outbox file.
    commands: dict[str, int] = field(default_factory=dict)


def endpoint_url(config: GatewayConfig) -> str | None:
    """Where the service's endpoint answers, from its config (None when it is off)."""
    if not config.http_port:
        return None
    host = config.http_host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: ask on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.http_port}"


def fetch_live(url: str, timeout: float) -> dict:
    """The service's /status.json; raises OSError or ValueError with a readable reason."""
    with urllib.request.urlopen(url.rstrip("/") + "/status.json", timeout=timeout) as res:
        return json.loads(res.read())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is the service running, with http_port set?"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def gather(args: argparse.Namespace) -> Sources:
    """Read the service and the outbox file as far as the arguments allow."""
    from tern.edge.config_file import flag_values, resolve

    src = Sources()
    try:
        config: GatewayConfig | None = resolve(path=args.config, flags=flag_values(args))
    except ConfigError:
        # Enough to go on without a full config: an endpoint or an outbox given directly.
        if not (args.url or getattr(args, "outbox_path", None)):
            raise
        config = None
    src.gateway_id = config.gateway_id if config else None
    src.url = args.url or (endpoint_url(config) if config else None)
    src.outbox_path = getattr(args, "outbox_path", None) or (config.outbox_path if config else None)
    if src.url is None:
        src.live_error = "the service's HTTP endpoint is off (http_port = 0): live counters need it"
    else:
        try:
            src.live = fetch_live(src.url, args.timeout)
        except (OSError, ValueError) as exc:
            src.live_error = f"service not reachable at {src.url}: {_reason(exc)}"
    if src.outbox_path:
        try:
            db = open_readonly(src.outbox_path)
            try:
                src.summary = summarize(db)
                src.nodes = read_node_rows(db)
                src.commands = pending_commands(db)
            finally:
                db.close()
        except (OSError, sqlite3.Error) as exc:
            src.outbox_error = f"outbox {src.outbox_path}: {exc}"
    return src


# --- rendering --------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _num(n: object) -> str:
    return "-" if n is None else f"{n:,}" if isinstance(n, int) else str(n)


def _state(state: str, down: list | None = None) -> Text:
    text = Text(state, style={"online": "bold green", "offline": "bold red"}.get(state, "dim"))
    if down and state == "online":  # sensors the node's status names as not answering
        text.append(f" ({', '.join(str(d) for d in down)} down)", style="yellow")
    return text


def _held(d: dict) -> Text | str:
    """Readings held back by the device's share or the rate limit; marked while it still is."""
    if "held_back" not in d:
        return "-"
    text = Text(f"{d['held_back']:,}")
    if d.get("held"):
        text.append(f" ({d.get('held_reason') or 'held'})", style="bold yellow")
    return text


def _up(flag: bool) -> Text:
    return Text("connected", style="bold green") if flag else Text("DOWN", style="bold red")


#: The device table's columns; the least useful give way first on a narrow terminal. The
#: device id and its state are never cut.
DEVICE_COLUMNS = (
    Column("device"), Column("state"), Column("last seen", 1), Column("last seq", 4, "right"),
    Column("firmware", 7), Column("boot", 9), Column("missing", 5, "right"), Column("dupl.", 8, "right"),
    Column("dropped", 6, "right"), Column("held back", 3, "right"), Column("waiting", 2, "right"), Column("site", 10),
)


def devices_table(src: Sources, limit: int | None = DEVICE_ROWS, width: int = 80) -> Table:
    """One row per device (live facts where the service answered, else the outbox file's),
    offline ones first; at most ``limit`` rows, so the screen stays one screen; columns
    fitted to ``width``."""
    ranked = device_rows(src)
    shown = ranked if limit is None else ranked[:limit]
    pending = _pending_by_device(src)
    rows = [
        [
            device, _state(d.get("state", "unknown"), d.get("down")), _age(d.get("last_seen_age_s")), _num(d.get("last_seq")),
            d.get("fw") or "-", d.get("boot") or "-", _num(d.get("missing")), _num(d.get("duplicates")),
            _num(d.get("dropped")), _held(d), _num(pending.get((site, device), 0)), site,
        ]
        for (site, device), d in shown
    ]
    if not rows:
        rows = [["(no device yet)", *[""] * (len(DEVICE_COLUMNS) - 1)]]
    caption = f"… and {len(ranked) - len(shown)} more devices (--all lists every one)" if len(shown) < len(ranked) else None
    return fitted_table(DEVICE_COLUMNS, rows, width, title="devices", title_justify="left", expand=False,
                        caption=caption, caption_justify="left")


def _pending_by_device(src: Sources) -> dict[tuple[str, str], int]:
    return {(d["site"], d["device"]): d["pending"] for d in (src.summary.devices if src.summary else [])}


def device_rows(src: Sources) -> list[tuple[tuple[str, str], dict]]:
    """((site, device), facts) for every device known to the service or the outbox file,
    offline ones first (live facts where the service answered)."""
    now = now_ms()
    rows: dict[tuple[str, str], dict] = {}
    for node in src.nodes:
        last = node.get("status_ms")
        rows[(node["site"], node["device"])] = {
            **node, "last_seen_age_s": None if last is None else max(0.0, (now - last) / 1000),
        }
    for d in (src.live or {}).get("devices", []):
        rows[(d["site"], d["device"])] = d
    for d in src.summary.devices if src.summary else []:
        row = rows.setdefault((d["site"], d["device"]), {"site": d["site"], "device": d["device"], "state": "unknown"})
        if row.get("last_seq") is None:  # the service is not answering: the outbox file knows this much
            row["last_seq"] = d["last_seq"]
    order = {"offline": 0, "unknown": 1}
    return sorted(rows.items(), key=lambda item: (order.get(item[1].get("state", "unknown"), 2), item[0]))


def outbox_panel(src: Sources) -> Panel:
    """Depth, bytes, oldest age, drain rate and time to empty."""
    live = (src.live or {}).get("outbox")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column(justify="right")
    if live is not None:
        readings, statuses = live["readings"], live["statuses"]
        age, size, dead = live["oldest_age_s"], live["bytes"], live["dead_letters"]
    elif src.summary is not None:
        readings, statuses = src.summary.pending, src.summary.status_pending
        age, size, dead = src.summary.oldest_pending_age_s(), file_bytes(src.outbox_path or ""), src.summary.dead_letters
    else:
        return Panel(Text(src.outbox_error or "outbox not readable", style="red"), title="outbox")
    grid.add_row("waiting", Text(f"{readings + statuses:,}", style="bold"))
    grid.add_row("readings / statuses", f"{readings:,} / {statuses:,}")
    grid.add_row("on disk", _bytes(size))
    grid.add_row("oldest", _age(age))
    if live is not None:
        drain, tte = live.get("drain_rate"), live.get("time_to_empty_s")
        grid.add_row("drain rate", "-" if drain is None else f"{drain:.1f} /s")
        grid.add_row("time to empty", "empty" if readings + statuses == 0 else "not draining" if tte is None else _age(tte))
        drops = live.get("drops") or {}
        grid.add_row("dropped", ", ".join(f"{r} {n:,}" for r, n in sorted(drops.items())) or "0")
    grid.add_row("dead letters", f"{dead:,}")
    grid.add_row("commands pending", commands_line(src))
    grid.add_row("file", src.outbox_path or "-")
    return Panel(grid, title="outbox", expand=False)


def commands_line(src: Sources, shown: int = 5) -> str:
    """Unfinished commands in all and for the first few devices: "3 (dev-a 2, dev-b 1)"."""
    live = (src.live or {}).get("commands")
    by_device = dict(live["by_device"]) if live is not None else src.commands
    total = sum(by_device.values())
    if not total:
        return "0"
    parts = [f"{device} {n}" for device, n in sorted(by_device.items())[:shown]]
    more = " …" if len(by_device) > shown else ""
    return f"{total:,} ({', '.join(parts)}{more})"


def uplink_panel(src: Sources) -> Panel:
    """Both links and the counters since start (live only)."""
    if src.live is None:
        return Panel(Text("unknown: the service did not answer", style="yellow"), title="links", expand=False)
    live = src.live
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column(justify="right")
    gw = live["gateway"]
    grid.add_row("local broker", Text.assemble(_up(live["ingest"]["connected"]), f"  {gw['local_broker']}"))
    grid.add_row("cloud uplink", Text.assemble(_up(live["uplink"]["connected"]), f"  {gw['cloud_broker']}"))
    grid.add_row("batches in flight", _num(live["uplink"]["batches_in_flight"]))
    rtt = live["uplink"].get("last_confirm_rtt_s")
    grid.add_row("confirm round trip", "-" if rtt is None else f"{rtt * 1000:.0f} ms")
    grid.add_row("received / duplicates", f"{live['ingest']['received']:,} / {live['ingest']['duplicates']:,}")
    gaps_open = live["ingest"].get("gaps_open")
    grid.add_row("missing (open gaps)", f"{_num(live['ingest'].get('missing'))} ({_num(gaps_open)})")
    grid.add_row("forwarded", f"{live['uplink']['forwarded']:,}")
    grid.add_row("nodes online / offline", f"{live['nodes']['online']} / {live['nodes']['offline']}")
    if live["ingest"].get("devices_held"):
        grid.add_row("held back", Text(f"{live['ingest']['devices_held']} device(s) over their share or rate; others continue",
                                       style="bold yellow"))
    if live["ingest"]["backpressure"]:
        grid.add_row("", Text("outbox full: readings not acknowledged", style="bold yellow"))
    return Panel(grid, title="links", subtitle=f"up {_age(gw.get('uptime_s'))}", subtitle_align="left", expand=False)


def updates_table(src: Sources, width: int = 80) -> Table | None:
    """The nodes downloading a release from this gateway (live only; None when there is none)."""
    downloads = ((src.live or {}).get("ota") or {}).get("downloads") or []
    if not downloads:
        return None
    pace = (src.live or {}).get("ota", {}).get("chunks_per_s")
    rows = [[d["device"], d["version"], f"{d['pct']}%", f"{_bytes(d['bytes'])} of {_bytes(d['total'])}",
             Text(d["state"], style={"stalled": "bold yellow", "fetched": "green"}.get(d["state"], "")),
             _age(d["idle_s"]), d["site"]] for d in downloads]
    columns = (Column("device"), Column("version"), Column("done", 0, "right"), Column("bytes", 2, "right"),
               Column("state"), Column("last ask", 1, "right"), Column("site", 3))
    return fitted_table(columns, rows, width, title=f"updates in progress (paced at {pace} chunks/s)",
                        title_justify="left", expand=False)


def render(src: Sources, console: Console, limit: int | None = DEVICE_ROWS) -> None:
    """Print the screen."""
    gid = (src.live or {}).get("gateway", {}).get("id") or src.gateway_id
    head = Text.assemble(("tern gateway ", "bold"), (gid or "", "bold cyan"))
    if src.live is not None:
        head.append(f"   live from {src.url}", style="dim")
    console.print(head)
    if src.live_error:
        console.print(Text(src.live_error + (" (showing the outbox file)" if src.summary else ""), style="bold yellow"), soft_wrap=True)
    if src.outbox_error:
        console.print(Text(src.outbox_error, style="bold red"), soft_wrap=True)
    console.print(devices_table(src, limit, console.width))
    updates = updates_table(src, console.width)
    if updates is not None:
        console.print(updates)
    console.print(Group(outbox_panel(src), uplink_panel(src)))


def as_json(src: Sources) -> dict:
    """Everything the screen shows, as one JSON-ready document (every device, none cut)."""
    summary = src.summary
    return {
        "gateway_id": (src.live or {}).get("gateway", {}).get("id") or src.gateway_id,
        "url": src.url,
        "live": src.live,
        "live_error": src.live_error,
        "outbox": None if summary is None else {
            "path": src.outbox_path,
            "readings": summary.pending,
            "statuses": summary.status_pending,
            "dead_letters": summary.dead_letters,
            "oldest_age_s": summary.oldest_pending_age_s(),
            "last_bseq": summary.last_bseq,
        },
        "outbox_error": src.outbox_error,
        "devices": [dict(d, site=site, device=device, waiting=_pending_by_device(src).get((site, device), 0))
                    for (site, device), d in device_rows(src)],
        "commands_pending": src.commands,
    }


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    """``tern-gateway status``."""
    console = console or Console()
    src = gather(args)
    if getattr(args, "format", "table") == "json":
        print(json.dumps(as_json(src), indent=2, default=str))
        if src.live is None and src.summary is None:
            return EXIT_SETUP
        return EXIT_OK if src.live is not None else EXIT_UNREACHABLE
    if src.live is None and src.summary is None:
        for line in (src.live_error, src.outbox_error or ("no outbox given (--config or --outbox)" if not src.outbox_path else None)):
            if line:
                console.print(Text(line, style="bold red"), soft_wrap=True)
        return EXIT_SETUP
    render(src, console, None if getattr(args, "all", False) else DEVICE_ROWS)
    return EXIT_OK if src.live is not None else EXIT_UNREACHABLE
