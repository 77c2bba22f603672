# Talks text (pymemcache), meta and binary to memcached through record-proxy.py on port 21300.
# Produced memcached-1.6.18.transcript (memcached 1.6.18, Debian bookworm).
import socket, struct, time
from pymemcache.client.base import Client

# Connection 1: pymemcache, classic text protocol (noreply sets by default).
c = Client(("127.0.0.1", 21300))
c.set("alpha", b"hello world")                   # noreply
c.set("beta", b"x" * 600, noreply=False)         # STORED, 600-byte value
print(c.get("alpha"), c.get("missing"))
print(c.get_many(["alpha", "nope", "beta"]).keys())
c.add("alpha", b"v", noreply=False)              # NOT_STORED
c.set("n", b"10", noreply=False)
print(c.incr("n", 5), c.decr("n", 20), c.incr("nokey", 1))
print(c.touch("alpha", 100, noreply=False), c.touch("nokey", 100, noreply=False))
v, cas = c.gets("alpha")
print(c.cas("alpha", b"new", cas, noreply=False), c.cas("alpha", b"newer", cas, noreply=False))
print(c.delete("alpha", noreply=False), c.delete("alpha", noreply=False))
print(len(c.stats()), c.version())
c.close()

def raw(payloads):
    s = socket.create_connection(("127.0.0.1", 21300))
    for p, expect_reply in payloads:
        s.sendall(p)
        if expect_reply:
            time.sleep(0.05)
            s.recv(65536)
    time.sleep(0.05)
    s.close()

# Connection 2: meta commands, including a quiet pipeline closed by mn.
raw([
    (b"ms mk 5 T0\r\nhello\r\n", True),
    (b"mg mk v t f\r\n", True),
    (b"mg nope v\r\n", True),
    (b"mg mk v q k\r\nmg nope1 v q k\r\nmg nope2 v q k O9\r\nmn\r\n", True),
    (b"md mk q\r\nmd mk\r\n", True),
    (b"ma counter N0 J5 v\r\n", True),
    (b"ma counter D2 v\r\n", True),
    (b"mg " + b"YmluYXJ5" + b" b v\r\n", True),
    (b"me counter\r\n", True),
])

def pkt(op, key=b"", extras=b"", value=b"", opaque=0):
    body = extras + key + value
    return struct.pack(">BBHBBHII", 0x80, op, len(key), len(extras), 0, 0, len(body), opaque) + b"\0" * 8 + body

# Connection 3: binary protocol, dalli-style (version first, GetKQ batch closed by NoOp).
raw([
    (pkt(0x0b, opaque=1), True),
    (pkt(0x01, b"bk", b"\0" * 8, b"v" * 400, opaque=2), True),
    (pkt(0x00, b"bk", opaque=3), True),
    (pkt(0x00, b"nokey", opaque=4), True),
    (pkt(0x0d, b"bk", opaque=5) + pkt(0x0d, b"nokey", opaque=6) + pkt(0x11, b"q1", b"\0" * 8, b"abc", opaque=7) + pkt(0x0a, opaque=8), True),
    (pkt(0x02, b"bk", b"\0" * 8, b"dup", opaque=9), True),
    (pkt(0x05, b"bctr", b"\0" * 8 + struct.pack(">Q", 0) + b"\xff" * 4, opaque=10), True),
    (pkt(0x04, b"bk", opaque=11), True),
    (pkt(0x10, opaque=12), True),
])
