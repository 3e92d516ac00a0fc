# Unacked readings on flash, so they outlive a reset, a crash, a power cut or deep sleep.
#
# A journal of append-only segment files "spill.<n>" (n grows forever), each holding at most
# `seg` records of one line: "<boot> <seq> <stored part of the reading>\n". Written with wear
# in mind: a record is only ever appended (littlefs spreads appends over free blocks), a
# segment is deleted whole once every record in it is acked, and at most `nsegs` segments
# exist: starting one more deletes the oldest, and its unacked records are counted as
# dropped, per boot, in "spill.drop" (reported in the next birth message).
# "spill.pos" holds how far the oldest segment is acked ("<n> <offset>"), so a reset does
# not send acked records again; it is rewritten once per acked message during a replay.
import os

PREFIX = "spill."
MAX_DROP_BOOTS = 8


def _remove(name):
    try:
        os.remove(name)
    except OSError:
        pass


def _size(name):
    try:
        return os.stat(name)[6]
    except OSError:
        return 0


class Spill:
    def __init__(self, max_records, seg, window=4):
        self.seg = seg
        self.nsegs = max(2, (max_records + seg - 1) // seg)
        self.window = window
        ids = []
        for name in os.listdir():
            if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
                ids.append(int(name[len(PREFIX):]))
        ids.sort()
        while len(ids) > self.nsegs:          # a smaller config than last boot: oldest go
            self._drop_segment(ids.pop(0))
        self.first = ids[0] if ids else 0     # oldest segment on flash
        self.last = ids[-1] if ids else -1    # segment being appended to (-1: none)
        del ids
        self.count = self._lines(self.last) if self.last >= self.first else 0
        if self.count and not self._ends_clean(self.last):
            self.count = self.seg                 # a torn last line: append to a new segment
        self.ack_seg = self.first             # everything before (ack_seg, ack_off) is acked
        self.ack_off = 0
        try:
            with open(PREFIX + "pos") as f:
                p = f.read().split()
            if int(p[0]) == self.first:
                self.ack_off = int(p[1])
        except (OSError, ValueError, IndexError):
            pass
        self.rewind()

    # --- names and counts ------------------------------------------------------------

    def _name(self, n):
        return PREFIX + str(n)

    def _lines(self, n):
        c = 0
        try:
            with open(self._name(n), "rb") as f:
                while f.readline():
                    c += 1
        except OSError:
            pass
        return c

    def _ends_clean(self, n):
        sz = _size(self._name(n))
        try:
            with open(self._name(n), "rb") as f:
                f.seek(sz - 1)
                return f.read(1) == b"\n"
        except OSError:
            return True

    def empty(self):
        return self.last < self.first

    def pending(self):
        """True while records wait to be sent (not merely acked)."""
        if self.empty():
            return False
        return self.send_seg < self.last or self.send_off < _size(self._name(self.last))

    def drops(self):
        """{boot: readings dropped} not yet reported."""
        try:
            import json
            with open(PREFIX + "drop") as f:
                d = json.load(f)
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def clear_drops(self):
        _remove(PREFIX + "drop")

    # --- writing ---------------------------------------------------------------------

    def append(self, boot, seq, payload):
        """Journal one reading (payload: the stored part, bytes or memoryview)."""
        if self.empty() or self.count >= self.seg:
            self.last += 1
            if self.empty():
                self.first = self.last
                self.ack_seg, self.ack_off = self.last, 0
                self.rewind()
            self.count = 0
            if self.last - self.first >= self.nsegs:
                self._drop_segment(self.first)
                self.first += 1
                if self.ack_seg < self.first:
                    self.ack_seg, self.ack_off = self.first, 0
                    self._save_pos()
                self.rewind()                  # in-flight records may have gone
        line = ("%s %d " % (boot, seq)).encode() + bytes(payload) + b"\n"   # (payload may be a memoryview)
        with open(self._name(self.last), "ab") as f:
            f.write(line)   # one write: a power cut tears at most this line
        self.count += 1

    def _drop_segment(self, n):
        """Delete segment n, counting its unacked records per boot in spill.drop."""
        d = self.drops()
        skip = self.ack_off if n == getattr(self, "ack_seg", -1) else 0
        lost = 0
        try:
            with open(self._name(n), "rb") as f:
                f.seek(skip)
                while True:
                    line = f.readline()
                    if not line:
                        break
                    sp = line.find(b" ")
                    if not 4 <= sp <= 32:
                        continue                # torn by a power cut: no boot to blame
                    b = line[:sp].decode()
                    if b not in d and len(d) >= MAX_DROP_BOOTS:
                        b = sorted(d)[0]        # bounded: lump into one boot already listed
                    d[b] = d.get(b, 0) + 1
                    lost += 1
        except OSError:
            pass
        _remove(self._name(n))
        if lost:
            import json
            with open(PREFIX + "drop", "w") as f:
                json.dump(d, f)
            print("TERN spill_dropped %d" % lost)

    # --- reading and acks --------------------------------------------------------------

    def rewind(self):
        """Send again from the oldest unacked record (after a reconnect or a lost ack)."""
        self.send_seg = self.ack_seg
        self.send_off = self.ack_off
        self.inflight = []                    # [(boot, last seq, seg, end offset)], <= window

    def can_send(self):
        return len(self.inflight) < self.window and self.pending()

    def next_batch(self, k, buf):
        """Read up to k unsent records of one boot into buf (a list, cleared first).

        Returns the boot, or None; each item is (seq, stored part as bytes)."""
        del buf[:]
        boot = None
        while not self.empty() and self.send_seg <= self.last:
            name = self._name(self.send_seg)
            stop = False
            try:
                with open(name, "rb") as f:
                    f.seek(self.send_off)
                    while len(buf) < k:
                        line = f.readline()
                        if not line:
                            break
                        try:
                            sp = line.index(b" ")
                            sp2 = line.index(b" ", sp + 1)
                            b = line[:sp].decode()
                            s = int(line[sp + 1:sp2])
                        except ValueError:
                            s = -1
                        if s < 0 or line[-1:] != b"\n":
                            self.send_off += len(line)   # torn by a power cut: skip it
                            continue
                        if boot is None:
                            boot = b
                        elif b != boot:
                            stop = True                  # one boot per batch
                            break
                        buf.append((s, line[sp2 + 1:-1]))
                        self.send_off += len(line)
            except OSError:
                pass
            if stop or len(buf) >= k or self.send_seg >= self.last:
                break
            self.send_seg += 1                # this segment is all sent: on to the next
            self.send_off = 0
            if buf:
                break                          # one open file per batch is enough
        if not buf:
            return None
        self.inflight.append((boot, buf[-1][0], self.send_seg, self.send_off))
        return boot

    def ack(self, boot, seq):
        """A gateway ack (boot, seq): everything of that boot up to seq is committed."""
        # The gateway handles one node's messages in order, so an ack for a later message
        # also settles the ones before it (even one it dead-lettered and never acked).
        k = -1
        for i in range(len(self.inflight)):
            e = self.inflight[i]
            if e[0] == boot and e[1] <= seq:
                k = i
        if k < 0:
            return False
        _, _, self.ack_seg, self.ack_off = self.inflight[k]
        del self.inflight[:k + 1]
        # Whole segments behind the ack point go; the one in progress stays.
        while self.first < self.ack_seg:
            _remove(self._name(self.first))
            self.first += 1
        if self.ack_seg == self.last and self.ack_off >= _size(self._name(self.last)):
            _remove(self._name(self.last))     # all acked: the journal is empty
            self.first = self.last + 1
            self.ack_seg, self.ack_off = self.first, 0
            self.send_seg, self.send_off = self.first, 0
            self.count = 0
            _remove(PREFIX + "pos")
            return True
        self._save_pos()
        return True

    def _save_pos(self):
        with open(PREFIX + "pos", "w") as f:
            f.write("%d %d" % (self.ack_seg, self.ack_off))
