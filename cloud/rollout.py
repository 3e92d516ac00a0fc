"""The rules of a fleet rollout (``tern-bridge ota rollout``), apart from Kafka: which nodes go
in which wave, what a node's status record says about its update, and when to halt.

A rollout keeps no state of its own: where each node is comes from the status topic (its
births carry ``fw`` and ``ota``), so a rollout run again after a crash starts from what the
nodes say. A node already healthy on the release is done; the others are planned again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

#: The rollout states a node's own ``ota`` report maps to (while its update is under way).
PROGRESS = ("downloading", "verifying", "trial")


def healthy(status: Mapping[str, Any] | None, release: str) -> bool:
    """True when a status value says the node runs ``release`` and it proved itself: online, ``fw``
    is the release, and no ``ota`` report or one saying ``ok`` (a release proved at an earlier
    boot is not reported again)."""
    if status is None or status.get("state") != "online" or status.get("fw") != release:
        return False
    ota = status.get("ota")
    return ota is None or ota.get("st") == "ok"


@dataclass(frozen=True)
class Verdict:
    """What one status record says about a node's update: a rollout state and its detail."""

    state: str
    detail: str = ""


def judge(status: Mapping[str, Any], release: str, boot_at_send: str) -> Verdict | None:
    """What ``status`` (a ``tern.status/1`` value of a node sent the update) says, or None if
    nothing about this update. A refusal or rollback counts only from a boot after the one the
    node had when the command was sent: the ota_update command reboots the node, and the
    report an earlier attempt left in the node's births is not this attempt's outcome."""
    if healthy(status, release):
        return Verdict("healthy")
    ota = status.get("ota")
    if status.get("state") != "online" or not ota:
        return None
    st, ver, why = ota.get("st"), ota.get("ver"), ota.get("why", "")
    if st in ("refused", "rolled_back") and ver in (release, "?") and status.get("boot") != boot_at_send:
        return Verdict("failed", f"{st.replace('_', ' ')}: {why}" if why else st.replace("_", " "))
    if st in PROGRESS and ver == release:
        return Verdict(st, f"{ota['pct']}%" if "pct" in ota else "")
    return None


@dataclass
class Plan:
    """The nodes of a rollout: those already done, then the waves (wave 0 the canary group)."""

    already: list[str]
    skipped: dict[str, str]
    waves: list[list[str]] = field(default_factory=list)


def plan(targets: list[str], latest: Mapping[str, Mapping[str, Any]], release: str, canary: float,
         wave_size: int, online_only: bool = False) -> Plan:
    """Split ``targets`` (in order) into the waves of a rollout of ``release``.

    The canary group is the first ``ceil(canary × targets)`` nodes (at least one), counting the
    nodes already healthy on the release: a rollout run again after its canary proved itself
    goes on with the waves. The rest follow in waves of ``wave_size``. With ``online_only`` a
    node whose latest status is not ``online`` is left out (a site's nodes: one that is off
    would only time out).
    """
    already = [d for d in targets if healthy(latest.get(d), release)]
    skipped = {}
    pending = []
    for device in targets:
        if device in already:
            continue
        if online_only and (latest.get(device) or {}).get("state") != "online":
            skipped[device] = "offline when the rollout began"
        else:
            pending.append(device)
    out = Plan(already, skipped)
    if not pending:
        return out
    first = max(1, math.ceil(canary * len(targets))) - len(already)
    rest = pending
    if first > 0:
        out.waves.append(pending[:first])
        rest = pending[first:]
    else:
        out.waves.append([])   # the canary group proved itself in an earlier run
    for i in range(0, len(rest), max(1, wave_size)):
        out.waves.append(rest[i:i + max(1, wave_size)])
    return out


def halt_reason(failures: int, max_failures: int, canary: list[str], canary_healthy: int) -> str:
    """Why the rollout must stop after a wave ("" to go on): more failures than allowed, or a
    canary group in which no node proved itself."""
    if failures > max_failures:
        return f"{failures} failed, more than --max-failures {max_failures}"
    if canary and canary_healthy == 0:
        return f"no node of the canary group ({len(canary)}) became healthy"
    return ""


def parse_canary(text: str) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1 (a fraction of the targets in (0, 1])."""
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 < value <= 1:
        raise ValueError(f"--canary {text!r}: expected a share in (0, 100%]")
    return value
