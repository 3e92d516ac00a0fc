# Tern OTA fetch: download a release from the gateway into ota/stage, chunk by chunk, while
# the node keeps reading and publishing (docs/ota.md).
#
# The ota_update command (tern_cmd) writes the version to fetch in ota/fetch and reboots; this
# module is loaded (by tern_main) only at a boot that finds ota/fetch, on a tidy heap, and a
# reset or power cut resumes the download at the next boot. The node asks for one chunk
# at a time on tern/<site>/<dev>/fw_get ("<version> <file index> <offset>") and the gateway
# answers on .../fw (binary: tern/core/ota_wire.py). The offset asked for is the size of the
# staged file on flash, so what is on flash is never fetched again. File 0 is the manifest,
# 1 its signature (checked before any file is fetched), 2 + i the manifest's i-th file, whose
# size and SHA-256 are checked when it is whole (a bad one is fetched again, MAX_TRIES times).
# When every file is in, "ready" is written and the board resets into tern_boot's install.
# Progress goes out in the (retained) birth: {"st": "downloading", "ver", "pct"} once the
# signature is good and at each further quarter of the release's bytes, then "verifying" before
# the reset into the install: at most five births per boot of a download.
#
# Memory: one chunk (~1 KB) at a time, the manifest read a line at a time, no lists.
# Console: TERN ota want <idx> <off>   TERN ota bad_chunk <idx> <off>   TERN ota fetched <ver>
#          TERN error ota fetch <ver>: <why>
import gc
import os
import struct
import sys
import time
from binascii import hexlify
from hashlib import sha256

from tern_util import log

FETCH = "ota/fetch"
STAGE = "ota/stage"
WAIT_MS = 2000      # no answer in this long: ask again (requests and chunks are QoS 0)
QUIET_MS = 30000    # ... but after SILENT questions in a row without an answer, this long
SILENT = 5          # (a gateway that is down or serves no releases: a request per 30 s)
MAX_TRIES = 3       # a file that comes whole but wrong this many times: give up
HEAD = ">BBHIIH8s"  # magic, kind, file index, offset, file size, body length, sha256(body)[:8]
HEAD_LEN = 22
NAMES = ("manifest", "manifest.sig")


def size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def rm(path):
    try:
        os.remove(path)
    except OSError:
        pass


def name_ok(name):
    if not 1 <= len(name) <= 40 or name[0] == ".":
        return False
    for c in name:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_.-+"):
            return False
    return True


def staged_version():
    """The version of the manifest in the stage ("" if none)."""
    try:
        with open(STAGE + "/manifest") as f:
            for _ in range(3):
                p = f.readline().split()
                if len(p) == 2 and p[0] == "version":
                    return p[1]
    except OSError:
        pass
    return ""


class Fetch:
    def __init__(self, node):
        self.node = node
        base = "tern/%s/%s/" % (node.site, node.device)
        self.t_get = base + "fw_get"
        self.t_fw = base + "fw"
        self.b_fw = self.t_fw.encode()
        self.ver = None
        self.subbed = False   # subscribed to t_fw on this connection
        self.reset()
        try:
            with open(FETCH) as f:
                v = f.read(40).strip()
        except OSError:
            return
        if not name_ok(v):
            rm(FETCH)
            return
        try:
            os.mkdir(STAGE)
        except OSError:
            pass
        if staged_version() not in ("", v):   # another release's files: start over
            for e in os.ilistdir(STAGE):
                if e[1] != 0x4000:
                    os.remove(STAGE + "/" + e[0])
        rm(STAGE + "/ready")
        self.ver = v
        log("ota fetch %s" % v)

    def reset(self):
        self.idx = 0
        self.name = None    # the file being fetched, its size and SHA-256 (files 2+)
        self.size = -1
        self.sha = None
        self.total = -1     # the gateway's size of the manifest or signature
        self.off = -1       # the offset asked for
        self.asked = None   # ticks of the last request (None: ask at the next pass)
        self.silent = 0     # requests in a row without an answer
        self.tries = 0
        self.error = None
        self.bytes = 0      # the release's files' bytes (the manifest's "files" line)
        self.done = 0       # ... of which whole and checked on flash
        self.told = -1      # the last quarter told in a birth

    def tell(self, client, st, why="", pct=-1):
        """A fresh (retained) birth saying where the update is: the gateway sends it on."""
        o = dict(self.node.ota)
        o.pop("pct", None)
        o["st"], o["ver"], o["why"] = st, self.ver, why[:120]
        if pct >= 0:
            o["pct"] = pct
        self.node.ota = o
        client.publish(self.node.t_status, self.node._status("online"), True, 1)

    def progress(self, client):
        """Tell the download's progress, once per quarter of the release's bytes."""
        if self.bytes <= 0:   # (the signature not checked yet)
            return
        pct = self.done * 100 // self.bytes
        if pct // 25 > self.told and pct < 100:
            self.told = pct // 25
            self.tell(client, "downloading", pct=pct)

    def give_up(self, client, why):
        log("error ota fetch %s: %s" % (self.ver, why))
        rm(FETCH)
        self.tell(client, "refused", why)   # the birth tells it
        self.ver = None

    def receive(self, msg):
        """A message on the fw topic (inside the MQTT callback): check it, append it."""
        if self.ver is None or len(msg) < HEAD_LEN + 1:
            return
        magic, kind, idx, off, total, n, check = struct.unpack_from(HEAD, msg)
        vl = msg[HEAD_LEN]
        start = HEAD_LEN + 1 + vl
        if magic != 0x46 or idx != self.idx or off != self.off or bytes(msg[HEAD_LEN + 1:start]) != self.ver.encode():
            return   # not the answer to our question (a late or stray one)
        self.silent = 0
        body = memoryview(msg)[start:]
        if len(body) != n or sha256(body).digest()[:8] != check:
            log("ota bad_chunk %d %d" % (idx, off))
            self.asked = None   # ask for it again at once
            return
        if kind == 1:
            self.error = "gateway: " + str(bytes(body), "utf-8")
            return
        if idx < 2:
            self.total = total
        elif total != self.size:
            self.error = "the gateway's %s is %d bytes, the manifest says %d" % (self.name, total, self.size)
            return
        if n:
            f = open(STAGE + "/" + self.name, "ab")
            try:
                f.write(body)
            finally:
                f.close()
        self.asked = None

    def poll(self, client):
        """(Connected, the link's service pass.) One step: check a whole file, or ask for a chunk."""
        if self.ver is None:
            return
        try:
            self.step(client)
        except (ValueError, IndexError, KeyError) as e:   # a signed but malformed manifest
            self.give_up(client, "%s %s" % (type(e).__name__, e))

    def step(self, client):
        if not self.subbed:
            # Only while a download runs, and QoS 0: a lost chunk is asked for again.
            try:
                client.subscribe(self.t_fw, 0)
            except Exception as e:
                if type(e).__name__ != "MQTTException":
                    raise   # the link is down: the link's service pass handles it
                return self.give_up(client, "the broker refused the subscription to %s (its ACL)" % self.t_fw)
            self.subbed = True
        if self.error:
            return self.give_up(client, self.error)
        now = time.ticks_ms()
        if self.asked is not None:
            if time.ticks_diff(now, self.asked) < (WAIT_MS if self.silent < SILENT else QUIET_MS):
                return
            self.silent += 1
        if self.name is None and not self.locate():
            return self.finish(client)
        path = STAGE + "/" + self.name
        have = max(0, size(path))
        want = self.total if self.idx < 2 else self.size
        if want >= 0 and have > want:   # longer than it should be: fetched again
            rm(path)
            have = 0
        elif want >= 0 and have == want:
            why = self.whole(path)
            if why:
                return self.give_up(client, why)
            return self.progress(client)
        self.off = have
        self.asked = now
        client.publish(self.t_get, "%s %d %d" % (self.ver, self.idx, have))
        log("ota want %d %d" % (self.idx, have))

    def locate(self):
        """Name, size and SHA-256 of file self.idx; False when there is none (all are in)."""
        if self.idx < 2:
            self.name = NAMES[self.idx]
            self.total = -1
            return True
        k = -1
        with open(STAGE + "/manifest") as f:
            while True:
                line = f.readline()
                if not line:
                    break
                p = line.split()
                if p and p[0] == "file":
                    k += 1
                    if k == self.idx - 2:
                        if not name_ok(p[1]) or p[1] in NAMES:
                            raise ValueError("manifest: bad file name")
                        self.name, self.size, self.sha = p[1], int(p[2]), p[3]
                        return True
        return False

    def whole(self, path):
        """File self.idx is whole on flash: check it and go on ("" or why to give up)."""
        if self.idx == 0:
            if self.total > 4096:
                return "manifest of %d bytes > 4096" % self.total
        elif self.idx == 1:
            why = self.verify()
            if why:
                rm(STAGE + "/manifest")
                rm(STAGE + "/manifest.sig")
                return why
            self.bytes = self.total_bytes()
        else:
            h = sha256()
            buf = bytearray(256)
            with open(path, "rb") as f:
                while True:
                    k = f.readinto(buf)
                    if not k:
                        break
                    h.update(memoryview(buf)[:k])
            if hexlify(h.digest()).decode() != self.sha:
                rm(path)
                self.tries += 1
                log("error ota %s corrupt, fetched again" % self.name)
                if self.tries >= MAX_TRIES:
                    return "%s corrupt %d times" % (self.name, self.tries)
                return ""
            self.done += self.size
        self.idx += 1
        self.name = None
        self.tries = 0
        return ""

    def verify(self):
        """The signature over the staged manifest, with the board's verify key ("" when good)."""
        gc.collect()
        try:
            import tern_sig   # (loaded for this check only)
            digest = tern_sig.file_hash(STAGE + "/manifest", bytearray(256))[0]
            tern_sig.verify(digest, STAGE + "/manifest.sig", tern_sig.read_key())
            return ""
        except Exception as e:   # tern_sig.Refused: the reason
            return str(e) or type(e).__name__
        finally:
            sys.modules.pop("tern_sig", None)
            gc.collect()

    def total_bytes(self):
        """The release's files' bytes, from the manifest's "files <count> <bytes>" line."""
        with open(STAGE + "/manifest") as f:
            while True:
                p = f.readline().split()
                if not p:
                    return 0
                if p[0] == "files":
                    return int(p[2])

    def finish(self, client):
        """Every file is in: mark the stage ready and reset into tern_boot's install."""
        with open(STAGE + "/ready", "w"):
            pass
        rm(FETCH)
        log("ota fetched %s" % self.ver)
        self.tell(client, "verifying")
        n = self.node
        n.save()        # unacked readings to flash first
        n.shutdown()
        import machine
        machine.reset()
