"""Commands to a node: the real firmware (tern_cmd.py) on the MicroPython unix port against a
real mosquitto. The test plays the gateway: it publishes on the node's cmd topic and reads the
node's replies with the shared codec (decode_node_reply), so a reply the gateway would refuse
fails here too.
"""

from __future__ import annotations

import json
import statistics
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from helpers import require_toolchain

from tern.core.codec import decode_reading, decode_status
from tern.core.commands import Command, NodeReply, decode_node_reply, encode_node_command
from tern.core.topics import command_topic, reply_topic, status_topic, telemetry_topic
from tern.device import EmulatedNode
from tern.harness.stack import Mosquitto
from tern.security.mosquitto_auth import DeviceAuth

SITE = "lab"
WAIT_S = 20.0


class Gateway:
    """A paho client in the gateway's place: sends commands, records replies and readings."""

    def __init__(self, port: int, username: str | None = None, password: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=username or "", protocol=mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("tern/#", 1)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT_S), "gateway could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def on(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.messages if t == topic]

    def wait(self, predicate, timeout: float = WAIT_S) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def send(self, device: str, cid: str, name: str, **args) -> None:
        raw = encode_node_command(Command(id=cid, device=device, name=name, args=args))
        self.send_raw(device, raw)

    def send_raw(self, device: str, raw: bytes) -> None:
        self.client.publish(command_topic(SITE, device), raw, qos=1).wait_for_publish(WAIT_S)

    def replies(self, device: str, cid: str | None = None) -> list[NodeReply]:
        out = [decode_node_reply(raw, topic_device=device) for raw in self.on(reply_topic(SITE, device))]
        return [r for r in out if cid is None or r.id == cid]

    def raw_replies(self, device: str, cid: str) -> list[bytes]:
        return [raw for raw in self.on(reply_topic(SITE, device)) if json.loads(raw)["id"] == cid]

    def call(self, device: str, cid: str, name: str, **args) -> NodeReply:
        """Send a command and wait (bounded) for its first reply."""
        before = len(self.replies(device, cid))
        self.send(device, cid, name, **args)
        assert self.wait(lambda g: len(g.replies(device, cid)) > before), f"no reply to {cid} {name}"
        return self.replies(device, cid)[-1]

    def readings(self, device: str) -> list:
        seen = {}
        for raw in self.on(telemetry_topic(SITE, device)):
            r = decode_reading(raw, site=SITE, topic_device=device)
            seen[(r.boot, r.seq)] = r
        return sorted(seen.values(), key=lambda r: (r.ts_ms, r.seq))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


_require_toolchain = require_toolchain


@pytest.fixture
def broker(tmp_path: Path):
    _require_toolchain()
    with Mosquitto(tmp_path / "broker") as m:
        yield m


def _gaps(readings) -> list[int]:
    return [b.ts_ms - a.ts_ms for a, b in zip(readings, readings[1:])]


def _flash_config(node: EmulatedNode) -> dict:
    return json.loads((node.workdir / "config.json").read_text())


def test_set_interval_changes_rate_once_per_command_id(tmp_path: Path, broker: Mosquitto) -> None:
    gw = Gateway(broker.port)
    node = EmulatedNode(tmp_path / "cmd-rate", device="cmd-rate", site=SITE, broker=broker.address, interval_ms=600)
    try:
        node.start()
        assert node.wait_connected(WAIT_S), node.log_text()
        assert gw.wait(lambda g: len(g.readings(node.device)) >= 4), node.log_text()
        slow = _gaps(gw.readings(node.device))
        assert min(slow) >= 450, slow

        reply = gw.call(node.device, "rate-1", "set_interval", s=0.1)
        assert reply.ok and reply.result == {"interval_ms": 100, "persisted": True, "applied": True}, reply
        n_before = len(gw.readings(node.device))
        assert gw.wait(lambda g: len(g.readings(node.device)) >= n_before + 12), node.log_text()
        fast = _gaps(gw.readings(node.device)[n_before + 1:])
        assert statistics.median(fast) <= 250, fast
        assert _flash_config(node)["interval_ms"] == 100

        # The same id again, with other arguments: answered with the first reply, not run.
        first_raw = gw.raw_replies(node.device, "rate-1")[0]
        gw.send(node.device, "rate-1", "set_interval", s=5)
        assert gw.wait(lambda g: len(g.raw_replies(node.device, "rate-1")) == 2), node.log_text()
        assert gw.raw_replies(node.device, "rate-1") == [first_raw, first_raw]
        assert node.wait_for(lambda n: "TERN cmd_dup rate-1" in n.tail, 5)
        n_dup = len(gw.readings(node.device))
        assert gw.wait(lambda g: len(g.readings(node.device)) >= n_dup + 8), "the node slowed down: run twice"
        assert statistics.median(_gaps(gw.readings(node.device)[n_dup:])) <= 250
        assert _flash_config(node)["interval_ms"] == 100
        # One "TERN cmd rate-1" line: executed once.
        assert node.log_text().count("TERN cmd rate-1 ") == 1, node.log_text()

        # Back to slow, by set_config this time.
        reply = gw.call(node.device, "rate-2", "set_config", key="interval_ms", value=700)
        assert reply.ok and reply.result == {"key": "interval_ms", "value": 700, "applied": True, "reboot": False}
        n_slow = len(gw.readings(node.device))
        assert gw.wait(lambda g: len(g.readings(node.device)) >= n_slow + 4), node.log_text()
        assert min(_gaps(gw.readings(node.device)[n_slow:])) >= 500
    finally:
        node.kill()
        gw.close()


def test_bad_commands_get_error_replies(tmp_path: Path, broker: Mosquitto) -> None:
    gw = Gateway(broker.port)
    node = EmulatedNode(tmp_path / "cmd-bad", device="cmd-bad", site=SITE, broker=broker.address, interval_ms=500)
    dev = node.device
    try:
        node.start()
        assert node.wait_connected(WAIT_S), node.log_text()
        flash_before = _flash_config(node)
        cases = [
            ("b-1", "self_destruct", {}, "unknown command"),
            ("b-2", "set_interval", {"s": "fast"}, "s must be a number"),
            ("b-3", "set_interval", {"ms": 5}, "interval_ms must be an integer in [10, 86400000]"),
            ("b-4", "set_interval", {}, "one of s or ms"),
            ("b-5", "set_interval", {"s": 1, "ms": 1000}, "one of s or ms"),
            ("b-6", "set_config", {"key": "no_such_key", "value": 1}, "unknown config key"),
            ("b-7", "set_config", {"key": "qos", "value": 2}, "qos must be an integer in [0, 1]"),
            ("b-8", "set_config", {"key": "device", "value": "evil"}, "set by flashing"),
            ("b-9", "set_config", {"key": "backoff_max_ms", "value": 20}, "backoff_max_ms must be >= backoff_min_ms"),
            ("b-10", "set_config", {"key": "ntp"}, "needs key"),
            ("b-11", "ping", {"x": 1}, "unexpected argument"),
            ("b-12", "get_config", {"key": "nope"}, "unknown config key"),
        ]
        for cid, name, args, why in cases:
            reply = gw.call(dev, cid, name, **args)
            assert not reply.ok and why in reply.error, (cid, reply)
        # Structure the codec would never send, straight onto the topic.
        gw.send_raw(dev, b'{"v":1,"id":"b-20","name":"ping","args":[1,2]}')
        gw.send_raw(dev, b'{"v":9,"id":"b-21","name":"ping"}')
        gw.send_raw(dev, b'{"v":1,"id":"b-22","name":42}')
        assert gw.wait(lambda g: all(g.replies(dev, c) for c in ("b-20", "b-21", "b-22")))
        assert "args must be an object" in gw.replies(dev, "b-20")[0].error
        assert "unsupported version" in gw.replies(dev, "b-21")[0].error
        assert "unknown command" in gw.replies(dev, "b-22")[0].error
        # Without a usable id there is nobody to answer: the node says so on its console.
        gw.send_raw(dev, b"not json at all")
        gw.send_raw(dev, b'{"v":1,"name":"ping"}')
        assert node.wait_for(lambda n: "TERN error cmd without a valid id (15 bytes)" in n.tail
                             and "TERN error cmd without a valid id (21 bytes)" in n.tail, 10), node.log_text()
        # None of that changed the flash config or the node: it still answers, still reads.
        assert _flash_config(node) == flash_before
        pong = gw.call(dev, "b-30", "ping")
        assert pong.ok and pong.result["boot"] == node.boot and node.boots == 1 and node.resets == 0
        # A read-only command's reply is not kept: a redelivery is answered with a new one (not
        # logged as a new command); the same id for a command that changes something is refused.
        again = gw.call(dev, "b-30", "ping")
        assert again.ok and again.result["boot"] == node.boot
        refused = gw.call(dev, "b-30", "set_interval", s=1)
        assert not refused.ok and "was used by a read-only command" in refused.error
        assert node.log_text().count("TERN cmd b-30 ") == 1 and node.log_text().count("TERN cmd_dup b-30") == 2
        assert _flash_config(node) == flash_before
        assert not [e for e in node.errors if "Traceback" in e or "MemoryError" in e], node.log_text()
    finally:
        node.kill()
        gw.close()


def test_config_rebirth_and_reboot(tmp_path: Path, broker: Mosquitto) -> None:
    gw = Gateway(broker.port)
    node = EmulatedNode(
        tmp_path / "cmd-cfg", device="cmd-cfg", site=SITE, broker=broker.address, interval_ms=300,
        extra_config={"wifi": {"ssid": "", "password": "hunter2-wifi"}},
    )
    dev = node.device
    try:
        node.start()
        assert node.wait_connected(WAIT_S), node.log_text()
        boot1 = node.boot
        mem0 = gw.call(dev, "p-0", "ping").result["mem_free"]

        # get_config: the running config, secrets masked.
        cfg = gw.call(dev, "g-1", "get_config")
        assert cfg.ok, cfg
        assert cfg.result["config"]["wifi"]["password"] == "***"
        assert cfg.result["config"]["mqtt_password"] == ""          # none set: nothing to hide
        assert cfg.result["config"]["interval_ms"] == 300 and cfg.result["config"]["device"] == dev
        assert b"hunter2-wifi" not in b"".join(gw.on(reply_topic(SITE, dev)))
        one = gw.call(dev, "g-2", "get_config", key="wifi.password")
        assert one.ok and one.result == {"key": "wifi.password", "value": "***"}

        # A key that needs a reboot: persisted to flash now, taken at the next boot.
        reply = gw.call(dev, "s-1", "set_config", key="ring_size", value=32)
        assert reply.ok and reply.result == {"key": "ring_size", "value": 32, "applied": False, "reboot": True}
        reply = gw.call(dev, "s-2", "set_config", key="wifi.password", value="new-secret-9")
        assert reply.ok and reply.result["value"] == "***"
        flash = _flash_config(node)
        assert flash["ring_size"] == 32 and flash["wifi"]["password"] == "new-secret-9"
        assert flash["device"] == dev and flash["interval_ms"] == 300    # the rest kept
        assert not (node.workdir / "config.json.tmp").exists()
        cfg = gw.call(dev, "g-3", "get_config")
        assert cfg.result["config"]["ring_size"] == 64 and cfg.result["reboot_pending"] == ["ring_size", "wifi.password"]

        # rebirth: the retained birth again, same boot.
        births = lambda g: [decode_status(p) for p in g.on(status_topic(SITE, dev))]  # noqa: E731
        n_births = len(births(gw))
        reply = gw.call(dev, "r-1", "rebirth")
        assert reply.ok and reply.result == {"boot": boot1}
        assert gw.wait(lambda g: len(births(g)) > n_births)
        assert births(gw)[-1].state == "online" and births(gw)[-1].boot == boot1
        assert json.loads(gw.on(status_topic(SITE, dev))[-1])["cmd"] == 1   # "I take commands"
        # The reply goes out before the birth (a gateway re-sends unanswered commands on a
        # birth), and the same command again is answered without another birth.
        with gw.cond:
            order = [t for t, p in gw.messages if t == status_topic(SITE, dev)
                     or (t == reply_topic(SITE, dev) and json.loads(p)["id"] == "r-1")]
        assert order[-2:] == [reply_topic(SITE, dev), status_topic(SITE, dev)], order
        n_births = len(births(gw))
        gw.send(dev, "r-1", "rebirth")
        assert gw.wait(lambda g: len(g.replies(dev, "r-1")) == 2)
        assert gw.call(dev, "r-2", "ping").ok and len(births(gw)) == n_births

        # ping: small-heap budget after all that (the emulator's 100K heap).
        pong = gw.call(dev, "p-1", "ping")
        assert pong.ok and pong.result["boot"] == boot1 and pong.result["seq"] >= 1
        # (the ring's buffers are allocated at boot: what is free now stays free, no leak)
        assert pong.result["mem_free"] > 12000 and pong.result["mem_free"] >= mem0 - 3000, (mem0, pong.result)
        assert pong.result["uptime_ms"] > 0 and pong.result["fw"]

        # reboot: the reply first, then machine.reset(); the node boots again from flash.
        reply = gw.call(dev, "x-1", "reboot")
        assert reply.ok and reply.result == {"boot": boot1, "rebooting": True}
        assert node.wait_for(lambda n: n.boots == 2 and n.connects >= 1, WAIT_S), node.log_text()
        assert node.boot != boot1 and node.resets == 1 and list(node.reset_causes) == ["SOFT_RESET"]
        cfg = gw.call(dev, "g-4", "get_config")
        assert cfg.result["config"]["ring_size"] == 32 and "reboot_pending" not in cfg.result
        pong = gw.call(dev, "p-2", "ping")
        assert pong.result["boot"] == node.boot

        # The reboot command delivered again after the reboot: answered, not run again
        # (the ids the node has seen are kept on flash).
        first = gw.raw_replies(dev, "x-1")[0]
        gw.send(dev, "x-1", "reboot")
        assert gw.wait(lambda g: len(g.raw_replies(dev, "x-1")) == 2)
        assert gw.raw_replies(dev, "x-1") == [first, first]
        pong = gw.call(dev, "p-3", "ping")
        assert pong.result["boot"] == node.boot and node.boots == 2 and node.resets == 1
    finally:
        node.kill()
        gw.close()


def test_node_without_heap_for_commands_runs_without_them(tmp_path: Path, broker: Mosquitto) -> None:
    """A ring too big to leave room for commands in the 100K heap: the node runs without them,
    sends readings, and says so."""
    gw = Gateway(broker.port)
    node = EmulatedNode(tmp_path / "cmd-full", device="cmd-full", site=SITE, broker=broker.address,
                        interval_ms=100, extra_config={"ring_size": 200, "ring_slot": 128, "spill_max": 0})
    try:
        node.start()
        assert node.wait_connected(WAIT_S), node.log_text()
        assert node.wait_for(lambda n: any("no memory for commands" in e for e in n.errors), 5), node.log_text()
        gw.send(node.device, "f-1", "ping")
        assert gw.wait(lambda g: len(g.readings(node.device)) >= 10), node.log_text()
        assert gw.replies(node.device) == [] and "f-1" not in node.log_text()
        births = [json.loads(p) for p in gw.on(status_topic(SITE, node.device))]
        assert births and all("cmd" not in b for b in births)   # the gateway can tell
        assert node.boots == 1 and not [e for e in node.errors if "MemoryError" in e]
    finally:
        node.kill()
        gw.close()


def test_acl_keeps_commands_and_replies_per_node(tmp_path: Path) -> None:
    """With the Pi's ACL (tern.security): a node reads only its own commands and replies only
    as itself. "Dropped" is shown with a marker sent after the forbidden message on the same
    connection (MQTT keeps one connection's messages in order)."""
    _require_toolchain()
    auth = DeviceAuth(tmp_path / "auth")
    gw_pw = auth.set_gateway("tern-gateway")
    pw = {d: auth.add_device(d, SITE) for d in ("node-a", "node-b")}
    with Mosquitto(tmp_path / "mq", auth_folder=auth.folder) as broker:
        gw = Gateway(broker.port, "tern-gateway", gw_pw)
        node_b = EmulatedNode(tmp_path / "node-b", device="node-b", site=SITE, broker=broker.address,
                              interval_ms=500, extra_config={"mqtt_password": pw["node-b"]})
        # node-a's account used by a hand-made client: it tries what the firmware never would.
        rogue = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="node-a", protocol=mqtt.MQTTv311)
        rogue.username_pw_set("node-a", pw["node-a"])
        rogue_got: list[tuple[str, bytes]] = []
        rogue.on_message = lambda c, u, m: rogue_got.append((m.topic, m.payload))
        suback = threading.Event()
        rogue.on_subscribe = lambda *a: suback.set()
        try:
            node_b.start()
            assert node_b.wait_connected(WAIT_S), node_b.log_text()
            rogue.connect("127.0.0.1", broker.port)
            rogue.loop_start()
            rogue.subscribe(command_topic(SITE, "node-b"), 1)
            assert suback.wait(WAIT_S)

            # The gateway's command reaches node-b, which answers; the rogue reads nothing.
            reply = gw.call("node-b", "acl-1", "get_config")
            assert reply.ok and reply.result["config"]["mqtt_password"] == "***"
            assert pw["node-b"].encode() not in b"".join(gw.on(reply_topic(SITE, "node-b")))

            # A reply forged on node-b's topic is dropped; node-a's own reply topic works.
            forged = json.dumps({"v": 1, "dev": "node-b", "id": "acl-1", "ok": True, "result": {"forged": True}}).encode()
            rogue.publish(reply_topic(SITE, "node-b"), forged, qos=1).wait_for_publish(WAIT_S)
            rogue.publish(reply_topic(SITE, "node-a"), b"marker-a", qos=1).wait_for_publish(WAIT_S)
            assert gw.wait(lambda g: g.on(reply_topic(SITE, "node-a")) == [b"marker-a"])
            assert forged not in gw.on(reply_topic(SITE, "node-b"))
            assert len(gw.replies("node-b", "acl-1")) == 1
            # A second command to node-b, answered after everything above: the rogue still saw none.
            assert gw.call("node-b", "acl-2", "ping").ok
            assert rogue_got == []
        finally:
            rogue.loop_stop()
            rogue.disconnect()
            node_b.kill()
            gw.close()
