"""One persistent MQTT session (paho), shared by the gateway's ingest and uplink and the cloud bridge.

All three hops rest on the same broker guarantee: with a stable client id and
``clean_session=False`` the broker keeps our subscriptions and every QoS 1 message we have
not yet acknowledged while we are down, slow or refusing to ack, and redelivers them on the
next connection. Getting that right takes the same handful of details everywhere, so they
live here once:

* a stable client id, ``clean_session=False``, MQTT 3.1.1, optionally ``manual_ack`` (the
  owner PUBACKs only once what it received is durable somewhere else);
* a raised in-flight window (paho's default of 20 QoS 1 messages caps throughput);
* ``connect_async`` + ``loop_start`` with a bounded back-off (1 s, doubling, capped at a few
  seconds), so a broker that is down at start-up is retried like any later outage instead of
  failing the start, and a returning link is used within seconds;
* an outage is said once, at once (which session, which broker, what it means for the data),
  repeated with a growing gap (:data:`REPORT_FIRST_S` doubling to :data:`REPORT_MAX_S`) while
  it lasts, and its end is said too, with how long it lasted;
* re-subscribe on every connect (harmless when the session kept the subscription, needed
  when the broker lost its state), and "connected" means *subscribed*: only then can
  nothing published to us be missed;
* a session taken over is named: MQTT lets one client id hold one connection, so a second
  client with our id (a second gateway, a cloned SD card) makes the broker close ours right
  after each connect, and both reconnect forever. Connections that close that soon, again
  and again, are said once as a contested client id, with the likely cause, and counted
  (:attr:`PersistentSession.takeovers`);
* a connection *generation* that changes on every connect, disconnect and stop. A PUBACK
  names a packet id, and ids only mean something on the connection that delivered the
  message: after a reconnect the broker resends what was unacked and may reuse an id. An
  owner that acks late records the generation a message arrived on and acks with
  :meth:`PersistentSession.ack`, which refuses (atomically with the counter) if that
  connection is gone.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from tern.core.mqtt_client import BufferedClient

_log = logging.getLogger(__name__)

#: What the owner is told about each received message (on paho's network thread: keep it short).
MessageHandler = Callable[[mqtt.MQTTMessage], None]
#: Called on paho's network thread after each successful connect / each disconnect.
Hook = Callable[[], None]

#: Cap of the reconnect back-off: a link that comes back is used within this (plus a connect).
DEFAULT_RECONNECT_MAX_S = 5.0
#: An outage is logged at once, again after this many seconds, then at doubling gaps ...
REPORT_FIRST_S = 10.0
#: ... of at most this.
REPORT_MAX_S = 300.0
#: A connection that the broker closes within this many seconds of its CONNACK is short-lived ...
TAKEOVER_SHORT_S = 5.0
#: ... and this many short-lived connections in a row, each within TAKEOVER_WINDOW_S of the
#: first, mean another client with our id keeps taking the session over.
TAKEOVER_COUNT = 3
TAKEOVER_WINDOW_S = 60.0


class PersistentSession:
    """A paho client on a persistent session that keeps itself connected and subscribed.

    ``start()`` returns at once; the connection comes up (and comes back) in the background.
    ``connected`` / ``wait_connected()`` report "connected and subscribed". ``stop()``
    disconnects cleanly: the session and everything un-acked in it stay on the broker.

    ``name`` and ``broker`` only label log lines; ``lost_hint`` says in the disconnect
    warning what the outage means for this owner; ``takeover_hint`` names the likely other
    holder of our client id when the session keeps being taken over. Log lines go to ``logger`` (the owner's,
    so they keep its name) or this module's.
    """

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        subscriptions: Sequence[tuple[str, int]],
        on_message: MessageHandler,
        *,
        manual_ack: bool = False,
        clean_session: bool = False,
        keepalive: int = 30,
        reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S,
        max_inflight: int = 100,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        name: str = "mqtt",
        broker: str | None = None,
        lost_hint: str = "paho reconnects",
        takeover_hint: str = "another client with the same client id",
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not subscriptions:
            raise ValueError("a persistent session needs at least one subscription")
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.name = name
        self.broker = broker or f"{host}:{port}"
        self.subscriptions = list(subscriptions)
        self._filters = ", ".join(topic for topic, _ in self.subscriptions)
        self.lost_hint = lost_hint
        self.takeover_hint = takeover_hint
        self.client_id = client_id
        self.reconnect_max_s = max(1, int(reconnect_max_s))
        self._on_message_hook = on_message
        self._on_connect_hook = on_connect
        self._on_disconnect_hook = on_disconnect
        self._log = logger or _log
        # Guards _generation and _stopping against a concurrent ack (see ack()).
        self._lock = threading.Lock()
        self._generation = 0
        self._stopping = False
        self._subscribed = threading.Event()
        self._error: str | None = None
        # Counts connects on which the broker had no session for us (the first one included):
        # whatever it had acknowledged and still held for us (queued messages) may be gone.
        self._new_sessions = 0
        self._session_present: bool | None = None
        # Outage bookkeeping, touched only on paho's network thread.
        self._was_connected = False
        self._outage_since: float | None = None
        self._attempts = 0
        self._report_gap = REPORT_FIRST_S
        self._next_report = 0.0
        self._refused = False
        # Takeover detection (network thread): when the current connection came up, when the
        # run of short-lived ones began and how long it is; whether it was said.
        self._connected_at = 0.0
        self._short_since = 0.0
        self._short_run = 0
        self._contested = False
        #: How many times a run of short-lived connections said our client id is contested.
        self.takeovers = 0

        # Buffered reads and grouped PUBACKs (tern.core.mqtt_client): paho's per-packet reads
        # were most of the gateway's ingest CPU.
        self.client = BufferedClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            # Persistent unless the owner says otherwise (a member of a shared subscription
            # group: a dead member's persistent session would keep taking its share).
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            manual_ack=manual_ack,
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls)
        # paho's default of 20 in-flight QoS 1 messages caps throughput (near 460 msg/s on
        # the gateway) and makes small outgoing acks/confirms queue behind each other.
        self.client.max_inflight_messages_set(max_inflight)
        self.client.reconnect_delay_set(1, self.reconnect_max_s)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_socket_open = _no_delay

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start paho's network thread; it connects and keeps reconnecting.

        Raises whatever ``connect_async`` raises for an unusable address (``ValueError``,
        ``OSError``); a broker that is merely down is not an error, it is retried.
        """
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly and stop the network thread.

        Nothing received so far may be acked after this (the generation moves on), and the
        resulting disconnect is not logged as an outage. Un-acked messages stay in the
        broker's session for the next run with this client id.
        """
        with self._lock:
            self._stopping = True
            self._generation += 1
        try:
            self.client.disconnect()
        except Exception:  # pragma: no cover - a broken socket at shutdown is not worth a crash
            self._log.debug("%s: disconnect failed", self.name, exc_info=True)
        self.client.loop_stop()
        self._subscribed.clear()

    # --- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while connected *and* subscribed."""
        return self._subscribed.is_set()

    def wait_connected(self, timeout: float | None) -> bool:
        """Block until connected and subscribed (or ``timeout``); True if so."""
        return self._subscribed.wait(timeout)

    @property
    def generation(self) -> int:
        """The current connection's generation; changes on every connect, disconnect and stop.

        Read it on the network thread when a message arrives (in ``on_message``) and hand it
        back to :meth:`ack`.
        """
        return self._generation

    @property
    def new_sessions(self) -> int:
        """How many connects found no session of ours on the broker (a fresh one was made).

        A change means the broker may have lost what it acknowledged earlier and had not yet
        passed on (messages queued for a subscriber, our own undelivered messages): an owner
        that re-sends on a lost session compares this with the value it saw when sending.
        """
        return self._new_sessions

    @property
    def session_present(self) -> bool | None:
        """The last CONNACK's session-present flag (None before the first connect)."""
        return self._session_present

    @property
    def error(self) -> str | None:
        """Why the broker last refused our connection or subscription, if it ever did."""
        return self._error

    def ack(self, mid: int, qos: int, generation: int | None = None) -> MQTTErrorCode | None:
        """PUBACK ``mid`` (with ``manual_ack``); paho's result, or None if it was not sent.

        With ``generation``, the ack is sent only if that connection is still the current
        one: checked and sent under the same lock that moves the generation on, so a
        reconnect cannot slip in between. Nothing is acked once :meth:`stop` has begun.
        """
        with self._lock:
            if self._stopping or (generation is not None and generation != self._generation):
                return None
            return self.client.ack(mid, qos)

    def ack_many(self, messages: Iterable[tuple[int, int, int]]) -> int:
        """PUBACK ``(mid, qos, generation)`` triples in order, in one write; how many were sent.

        As :meth:`ack`, atomically with the generation: a message that arrived on an earlier
        connection is skipped (the broker re-delivers it on this one), and nothing is acked
        once :meth:`stop` has begun.
        """
        with self._lock:
            if self._stopping:
                return 0
            current = self._generation
            due = [(mid, qos) for mid, qos, generation in messages if generation == current]
            self.client.ack_many(due)
        return len(due)

    # --- paho callbacks (network thread: keep them short) --------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._error = str(reason_code)
            self._unreachable(f"it refused the connection: {reason_code}")
            # paho reports the closed connection next: the same attempt, already counted.
            self._refused = True
            return
        self._refused = False
        with self._lock:
            self._generation += 1
            self._session_present = bool(flags.session_present)
            if not flags.session_present:
                self._new_sessions += 1
        if self._on_connect_hook is not None:
            self._on_connect_hook()
        # Re-subscribe on every connect: harmless when the session kept the subscription,
        # needed when the broker lost its state (or on a first start).
        client.subscribe(self.subscriptions)
        self._was_connected = True
        self._connected_at = time.monotonic()
        if self._outage_since is not None:
            if self._contested:  # said once, as a contested id: not each time round
                self._log.debug("%s: %s is back (session contested)", self.name, self.broker)
                self._outage_since = None
                self._attempts = 0
                return
            self._log.warning(
                "%s: %s is back after %.0f s (%d failed attempts); session present: %s",
                self.name, self.broker, time.monotonic() - self._outage_since, self._attempts, flags.session_present,
            )
            self._outage_since = None
            self._attempts = 0
        else:
            self._log.info("%s connected to %s (session present: %s)", self.name, self.broker, flags.session_present)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError:` around the connect: the exception
        # at hand says why.
        self._unreachable(describe_error(sys.exc_info()[1]))

    def _unreachable(self, why: str) -> None:
        """Count a failed connect; log the first at once and later ones at growing gaps."""
        if self._stopping:
            return
        now = time.monotonic()
        self._attempts += 1
        if self._outage_since is None:
            self._outage_since = now
            self._report_gap = REPORT_FIRST_S
            self._next_report = now + self._report_gap
            self._log.warning(
                "%s: cannot reach %s (%s); %s; retrying every %d s at most",
                self.name, self.broker, why, self.lost_hint, self.reconnect_max_s,
            )
        elif now >= self._next_report:
            self._report_gap = min(self._report_gap * 2, REPORT_MAX_S)
            self._next_report = now + self._report_gap
            self._log.warning(
                "%s: still cannot reach %s after %.0f s (%d attempts, last: %s); %s",
                self.name, self.broker, now - self._outage_since, self._attempts, why, self.lost_hint,
            )

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self._error = f"subscription to {self._filters} refused: {reason_codes}"
            self._log.error("%s: %s: %s", self.name, self.broker, self._error)
            return
        # "Connected" means subscribed: only then can nothing published to us be missed.
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._lock:
            self._generation += 1
        self._subscribed.clear()
        if self._on_disconnect_hook is not None:
            self._on_disconnect_hook()
        if self._stopping:
            return
        why = describe_disconnect(flags, reason_code)
        if self._was_connected:
            # The outage starts now; failed reconnects report on from here.
            self._was_connected = False
            now = time.monotonic()
            self._outage_since = now
            self._attempts = 0
            self._report_gap = REPORT_FIRST_S
            self._next_report = now + self._report_gap
            if self._note_connection_end(now, why):
                return
            self._log.warning(
                "%s: lost %s (%s); %s; reconnecting every %d s at most",
                self.name, self.broker, why, self.lost_hint, self.reconnect_max_s,
            )
        elif self._refused:
            self._refused = False
        else:
            # A reconnect whose TCP connection opened but closed before CONNACK (a proxy or a
            # load balancer in front of a dead broker, a broker shutting down): paho reports
            # it as a disconnect, not as a failed connect. It is a failed attempt all the same.
            self._unreachable(why)

    def _note_connection_end(self, now: float, why: str) -> bool:
        """Track short-lived connections; True while the session is known to be contested
        (the loss was already explained, once)."""
        lasted = now - self._connected_at
        if lasted >= TAKEOVER_SHORT_S or now - self._short_since > TAKEOVER_WINDOW_S:
            if lasted >= TAKEOVER_SHORT_S and self._contested:
                self._log.warning("%s: the session on %s lasted %.0f s: no longer contested", self.name, self.broker, lasted)
                self._contested = False
            self._short_run = 0
            self._short_since = now
        if lasted >= TAKEOVER_SHORT_S:
            return False
        self._short_run += 1
        if self._short_run >= TAKEOVER_COUNT and not self._contested:
            self._contested = True
            self.takeovers += 1
            self._log.error(
                "%s: %s closed our connection right after each connect (%d times in %.0f s; last: %s): "
                "client id %r is contested, most likely by %s. Both will keep taking the session "
                "from each other until one stops.",
                self.name, self.broker, self._short_run, now - self._short_since, why, self.client_id, self.takeover_hint,
            )
        return self._contested

    @property
    def contested(self) -> bool:
        """True while short-lived connections say another client holds our client id (a
        connection that has outlasted the short span ends it)."""
        if not self._contested:
            return False
        return not self.connected or time.monotonic() - self._connected_at < TAKEOVER_SHORT_S

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_message_hook(message)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Turn off Nagle's algorithm on the session's socket.

    A PUBACK followed at once by a small PUBLISH (a confirm, a node ack) otherwise waits for
    the peer's delayed ACK: ~40 ms per hop, measured by ``make bench``.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a unix socket or websocket)
        pass


def describe_disconnect(flags: Any, reason_code: Any) -> str:
    """A short reason for a lost connection; paho says "Unspecified error" for a reset socket."""
    name = str(reason_code)
    if getattr(flags, "is_disconnect_packet_from_server", False):
        return f"the broker disconnected us: {name}"
    if name == "Keep alive timeout":
        return "no answer within the keep-alive period"
    if name in ("Unspecified error", "Success"):
        return "the connection dropped"
    return name


def describe_error(exc: BaseException | None) -> str:
    """A short reason for a failed connect: "connection refused", "timed out", ..."""
    if exc is None:
        return "connection failed"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def probe(
    host: str,
    port: int,
    timeout: float = 5.0,
    *,
    client_id: str = "",
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> str | None:
    """One real MQTT handshake (CONNECT, wait for CONNACK), then disconnect: None if the broker
    accepted it, else why not.

    A clean session under its own client id: probing must never take over (and so kick off)
    a running owner's persistent session.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311
    )
    if username:
        client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    client.connect_timeout = timeout
    answer: list[Any] = []
    client.on_connect = lambda c, u, flags, rc, props: answer.append(rc)
    try:
        client.connect(host, port, keepalive=max(5, int(timeout) * 2))
    except (OSError, ValueError) as exc:
        return describe_error(exc)
    deadline = time.monotonic() + timeout
    try:
        while not answer and time.monotonic() < deadline:
            rc = client.loop(0.1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not answer:
                return f"the connection closed before CONNACK ({mqtt.error_string(rc)})"
    finally:
        if answer and not answer[0].is_failure:
            client.disconnect()
            client.loop(0.1)
        sock = client.socket()
        if sock is not None:
            sock.close()
    if not answer:
        return f"no CONNACK within {timeout:g} s"
    if answer[0].is_failure:
        return f"it refused the connection: {answer[0]}"
    return None
