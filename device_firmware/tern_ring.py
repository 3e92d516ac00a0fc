# The ring of unacked readings and the ack decoder (split out so each module compiles
# within a small heap).
import json


def parse_ack(msg):
    """(boot, seq) of a gateway ack {"v":1,"boot":...,"seq":N}, or None.

    Any boot: readings of an earlier boot come back from the flash spill."""
    try:
        a = json.loads(msg)
    except ValueError:
        return None
    if not isinstance(a, dict) or a.get("v") != 1:
        return None
    b = a.get("boot")
    s = a.get("seq")
    if not isinstance(b, str) or not isinstance(s, int) or s < 0:
        return None
    return b, s


class Ring:
    """Unacked readings, oldest first, in buffers allocated once at boot: `size` slots of
    `slot` bytes, in small chunks so a fragmented heap still has room for them.
    No per-reading allocation. Full -> drop the oldest and count it."""

    def __init__(self, size, slot):
        self.size = size
        self.slot = slot
        self.per = max(1, 256 // slot)    # slots per chunk: small, fits a fragmented heap
        self.chunks = []
        for _ in range((size + self.per - 1) // self.per):
            self.chunks.append(memoryview(bytearray(self.per * slot)))
        self.seq = [0] * size
        self.len = [0] * size
        self.head = 0
        self.count = 0
        self.dropped = 0

    def push(self, seq, payload):
        n = len(payload)
        if n > self.slot:
            raise ValueError("reading of %d bytes > ring_slot" % n)
        if self.count == self.size:
            self.pop()
            self.dropped += 1
        i = (self.head + self.count) % self.size
        o = (i % self.per) * self.slot
        self.chunks[i // self.per][o:o + n] = payload
        self.seq[i] = seq
        self.len[i] = n
        self.count += 1

    def payload(self, i):
        o = (i % self.per) * self.slot
        return self.chunks[i // self.per][o:o + self.len[i]]

    def pop(self):
        self.head = (self.head + 1) % self.size
        self.count -= 1

    def clear(self):
        self.head = 0
        self.count = 0

    def ack(self, upto):
        """Forget every reading with seq <= upto."""
        while self.count and self.seq[self.head] <= upto:
            self.pop()

    def first_after(self, seq):
        """Index of the oldest reading with a seq above `seq`, or -1."""
        for k in range(self.count):
            i = (self.head + k) % self.size
            if self.seq[i] > seq:
                return i
        return -1
