# Emulated ESP32 `network` for the MicroPython unix port (MICROPYPATH only, never a board).
# The station is "connected" as soon as connect() is called; the host's loopback is the LAN.
STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_WRONG_PASSWORD = 202
STAT_NO_AP_FOUND = 201


def hostname(name=None):
    return "tern-emu"


class WLAN:
    def __init__(self, interface=STA_IF):
        self.interface = interface
        self._active = False
        self._ssid = ""
        self._connected = False

    def active(self, flag=None):
        if flag is None:
            return self._active
        self._active = bool(flag)

    def connect(self, ssid=None, key=None, **kw):
        self._ssid = ssid or ""
        self._active = True
        self._connected = True

    def disconnect(self):
        self._connected = False

    def isconnected(self):
        return self._connected

    def status(self, param=None):
        if param == "rssi":
            return -50
        return STAT_GOT_IP if self._connected else STAT_IDLE

    def ifconfig(self, cfg=None):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, *args, **kw):
        if args:
            return {"mac": b"\x24\x0a\xc4\x00\x00\x01", "ssid": self._ssid, "essid": self._ssid,
                    "hostname": "tern-emu", "txpower": 20, "reconnects": -1}.get(args[0])

    def scan(self):
        return []
