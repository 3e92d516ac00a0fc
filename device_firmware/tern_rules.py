# Tern node config: the rules for single values, and the few that tie keys together.
#
# Shared by tern_config (the whole config.json, at boot and on the host) and tern_cmd (one
# key changed by a set_config command on a running node). A separate, small module because
# compiling all of tern_config needs ~30 KB of heap, more than a running node has free.

INTS = {
    "port": (1, 65535), "keepalive": (5, 65535), "interval_ms": (10, 86400000),
    "max_readings": (0, 1 << 30), "ring_size": (1, 4096), "ring_slot": (64, 4096), "qos": (0, 1),
    "timeout_ms": (100, 120000), "backoff_min_ms": (10, 3600000),
    "backoff_max_ms": (10, 3600000), "offline_reset_s": (0, 86400 * 7),
    "wdt_ms": (0, 3600000),
    "spill_max": (0, 65536), "spill_seg": (4, 4096), "bundle_max": (1, 32),
    "sleep_ms": (0, 86400000), "ack_wait_ms": (100, 120000),
}
STRINGS = ("mqtt_password", "tls_ca")       # at most 128 characters
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


class ConfigError(ValueError):
    pass


def check_id(value, what):
    # Same rule as tern/core/topics.py: 1-64 of [A-Za-z0-9_.-], not starting with . _ -
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or value[0] in "._-":
        raise ConfigError("invalid %s %r" % (what, value))
    for c in value:
        if c not in _ID_CHARS:
            raise ConfigError("invalid %s %r" % (what, value))
    return value


def check_value(key, v):
    """Check one scalar value: a top-level key, or "wifi.<field>". Raise ConfigError."""
    if key in INTS:
        lo, hi = INTS[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ConfigError("%s must be an integer in [%d, %d], got %r" % (key, lo, hi, v))
    elif key in ("site", "device"):
        check_id(v, key)
    elif key == "broker":
        if not isinstance(v, str) or not v:
            raise ConfigError("broker must be a host name or address")
    elif key == "ntp":
        if not isinstance(v, bool):
            raise ConfigError("ntp must be true or false")
    elif key in STRINGS:
        if not isinstance(v, str) or len(v) > 128:
            raise ConfigError("%s must be a string of at most 128 characters" % key)
    elif key in ("wifi.ssid", "wifi.password"):
        if not isinstance(v, str):
            raise ConfigError("wifi must be {\"ssid\": str, \"password\": str}")
    elif key == "wifi.timeout_ms":
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError("wifi.timeout_ms must be a non-negative integer")
    else:
        raise ConfigError("unknown config key %r" % (key,))
    return v


def check_together(cfg):
    """The rules that tie keys of a merged config together."""
    if cfg["backoff_max_ms"] < cfg["backoff_min_ms"]:
        raise ConfigError("backoff_max_ms must be >= backoff_min_ms")
    if cfg["bundle_max"] > 1 and cfg["bundle_max"] * (cfg["ring_slot"] + 16) + 128 > 4096:
        raise ConfigError("bundle_max * (ring_slot + 16) + 128 must fit the 4096-byte node payload")
