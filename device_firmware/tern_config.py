# Tern node configuration: config.json on flash, compiled-in defaults, validation.
#
# Runs unchanged on MicroPython (ESP32, unix port) and CPython (the host tools
# reuse load()/validate() to check a config before flashing it).
import json

# The rules for single values live in tern_rules (small: a running node checks a set_config
# command with them); the ranges of the integer keys are tern_rules.INTS.
from tern_rules import INTS as _INTS
from tern_rules import ConfigError, check_together, check_value

FW_VERSION = "0.1.0"
CONFIG_FILE = "config.json"

# Every key has a default; config.json only needs what differs.
DEFAULTS = {
    "site": "site1",
    "device": None,          # None -> "esp32-" + hex(machine.unique_id())
    "broker": "192.168.4.1",
    "port": 1883,
    "keepalive": 30,         # s, sent in CONNECT; we ping every keepalive/2
    "interval_ms": 1000,     # reading period
    "max_readings": 0,       # 0 = forever; else stop reading (stay connected) after N
    "ring_size": 64,         # unacked readings kept in RAM; oldest dropped when full
    "ring_slot": 128,        # bytes per ring slot: '"ts":<ms>,"r":{...}' of one reading
    "qos": 1,
    "timeout_ms": 5000,      # socket timeout for every blocking MQTT operation
    "backoff_min_ms": 1000,
    "backoff_max_ms": 60000,
    "offline_reset_s": 0,    # >0: machine.reset() after this long without the broker
    "wdt_ms": 0,             # >0: hardware watchdog, fed from the main loop
    "ntp": True,             # set the clock by NTP when it looks unset (year < 2024)
    "wifi": {"ssid": "", "password": "", "timeout_ms": 20000},
    # security: the MQTT username is the device id; both are set by `tern-device flash --auth-dir`
    "mqtt_password": "",     # "" = connect without credentials (an open broker)
    "tls_ca": "",            # CA file on flash; "" = plain MQTT, else TLS checked against it
    "sensors": [
        {"type": "adc", "name": "adc_mv", "pin": 34},
        {"type": "tmp102", "name": "temp_c", "i2c": 0, "scl": 18, "sda": 19, "addr": 72},
    ],
    # unacked readings on flash (tern_spill.py): they outlive resets, crashes and deep sleep
    "spill_max": 1024,       # readings kept on flash at most; oldest dropped (and told); 0 = off
    "spill_seg": 64,         # readings per append-only segment file (deleted whole when acked)
    "bundle_max": 8,         # readings per MQTT message when replaying a backlog; 1 = one each
    "sleep_ms": 0,           # >0: battery mode, deep sleep this long between wakes
    "ack_wait_ms": 5000,     # battery mode: how long a wake waits for the gateway's acks
}

SENSOR_TYPES = ("adc", "tmp102", "uart", "sht3x")
# Sensors that report several values take "names"; the defaults follow the protocol.
_MULTI_NAMES = {"pms5003": ["pm1_0", "pm2_5", "pm10"],
                "nmea": ["lat", "lon", "alt_m", "sats", "fix", "speed_kn"],
                "sht3x": ["sht_c", "sht_rh"]}


def _check_sensor(i, spec):
    if not isinstance(spec, dict):
        raise ConfigError("sensors[%d] must be an object" % i)
    kind = spec.get("type")
    if kind not in SENSOR_TYPES:
        raise ConfigError("sensors[%d].type must be one of %s" % (i, ", ".join(SENSOR_TYPES)))
    names = [spec.get("name")]
    if kind in ("uart", "sht3x"):
        proto = spec.get("protocol", "pms5003") if kind == "uart" else kind
        if not isinstance(proto, str) or proto not in _MULTI_NAMES or proto == "sht3x" and kind == "uart":
            raise ConfigError("sensors[%d].protocol must be pms5003 or nmea" % i)
        names = spec.get("names", _MULTI_NAMES[proto])
        if isinstance(names, list) and len(names) > len(_MULTI_NAMES[proto]):
            raise ConfigError("sensors[%d]: %s gives at most %d names" % (i, proto, len(_MULTI_NAMES[proto])))
    if not isinstance(names, list) or not names:
        raise ConfigError("sensors[%d] needs a name" % i)
    for n in names:
        if not isinstance(n, str) or not 1 <= len(n) <= 32:
            raise ConfigError("sensors[%d]: reading names must be 1-32 characters" % i)
    # The label names the sensor when it is down (the status's "down" list: 1-32 of
    # [A-Za-z0-9_.-]); made so here, at boot, so the running node carries no code for it.
    label = spec.get("label", names[0] if kind in ("adc", "tmp102") else proto)
    safe = "".join(c if "a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_.-" else "_"
                   for c in str(label)[:32]) or "sensor"
    if safe != label:
        spec["label"] = safe
    for key in ("pin", "i2c", "scl", "sda", "addr", "uart", "tx", "rx", "baud", "max_age_ms"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 0):
            raise ConfigError("sensors[%d].%s must be a non-negative integer" % (i, key))


def validate(cfg):
    """Check a merged config dict in place; raise ConfigError naming the bad key."""
    for key in cfg:
        if key not in DEFAULTS:
            raise ConfigError("unknown config key %r" % key)
    check_value("site", cfg["site"])
    if cfg["device"] is not None:
        check_value("device", cfg["device"])
    check_value("broker", cfg["broker"])
    for key in _INTS:
        check_value(key, cfg[key])
    check_together(cfg)
    check_value("ntp", cfg["ntp"])
    for key in ("mqtt_password", "tls_ca"):
        check_value(key, cfg[key])
    wifi = cfg["wifi"]
    if not isinstance(wifi, dict) or not isinstance(wifi.get("ssid", ""), str) \
            or not isinstance(wifi.get("password", ""), str):
        raise ConfigError("wifi must be {\"ssid\": str, \"password\": str}")
    sensors = cfg["sensors"]
    if not isinstance(sensors, list) or not sensors or len(sensors) > 16:
        raise ConfigError("sensors must be a list of 1-16 sensor specs")
    for i in range(len(sensors)):
        _check_sensor(i, sensors[i])
    return cfg


def merge(user):
    if not isinstance(user, dict):
        raise ConfigError("config must be a JSON object")
    cfg = {}
    for key in DEFAULTS:
        cfg[key] = DEFAULTS[key]
    for key in user:
        cfg[key] = user[key]
    w = {}
    for key in DEFAULTS["wifi"]:
        w[key] = DEFAULTS["wifi"][key]
    if isinstance(cfg["wifi"], dict):
        for key in cfg["wifi"]:
            w[key] = cfg["wifi"][key]
        cfg["wifi"] = w
    return validate(cfg)


def load(path=CONFIG_FILE):
    """Read config.json (missing file -> all defaults) and return the validated dict.

    A missing "device" becomes "esp32-" + hex(machine.unique_id()).
    """
    try:
        f = open(path)
    except OSError:
        user = {}
    else:
        try:
            user = json.load(f)
        except ValueError as e:
            raise ConfigError("%s is not valid JSON: %s" % (path, e))
        finally:
            f.close()
    cfg = merge(user)
    if cfg["device"] is None:
        import machine
        cfg["device"] = default_device(machine.unique_id())
    return cfg


def default_device(uid):
    """Device id from machine.unique_id() bytes."""
    h = ""
    for b in uid:
        h += "%02x" % b
    return "esp32-" + h
