"""Traffic of the `cargo xtask fleet-test` VMs, through pymemcache (a real client library).

  fleet_client.py load SECONDS RATE SERVER...   HashClient over the pool: sets and gets spread
      over the servers by the client's hashing, at about RATE requests per second; a server
      that stops answering times out (timeout 3 s) and is retried after a short dead time.
  fleet_client.py idle ROUNDS SLEEP CONNECTIONS SERVER   CONNECTIONS pooled clients each set a
      key, idle for SLEEP seconds (longer than the server's idle timeout), then set again:
      writes onto connections the server has closed.

Prints one summary line of counts at the end, for the host's log.
"""
import sys
import time

from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient


def address(text):
    host, port = text.rsplit(":", 1)
    return (host, int(port))


def load(seconds, rate, servers):
    client = HashClient(
        [address(s) for s in servers],
        connect_timeout=1.0,
        timeout=3.0,
        use_pooling=False,
        retry_attempts=1,
        retry_timeout=0,
        dead_timeout=2,
        ignore_exc=True,
    )
    end = time.time() + seconds
    interval = 1.0 / rate
    counts = {"set": 0, "get": 0, "hit": 0, "failed": 0}
    i = 0
    while time.time() < end:
        started = time.time()
        key = "k%d" % (i % 200)
        try:
            if i % 2 == 0:
                client.set(key, b"v" * 100)
                counts["set"] += 1
            else:
                if client.get(key) is not None:
                    counts["hit"] += 1
                counts["get"] += 1
        except Exception:
            counts["failed"] += 1
        i += 1
        spare = interval - (time.time() - started)
        if spare > 0:
            time.sleep(spare)
    print("load", " ".join("%s=%d" % kv for kv in sorted(counts.items())), flush=True)


def idle(rounds, sleep, connections, server):
    clients = [Client(address(server), connect_timeout=2, timeout=2) for _ in range(connections)]
    counts = {"ok": 0, "closed_by_server": 0}
    for _ in range(rounds):
        for n, client in enumerate(clients):
            try:
                client.set("session%d" % n, b"s")
            except Exception:
                # The previous round's late write left this connection reset (EPIPE on the
                # next write): the application sees the error; the next call reconnects.
                counts["closed_by_server"] += 1
                client.close()
        time.sleep(sleep)
        for n, client in enumerate(clients):
            try:
                client.set("session%d" % n, b"t")
                counts["ok"] += 1
            except Exception:
                # The server had closed the idle connection: pymemcache finds out only by
                # writing onto it. It reconnects on the next call.
                counts["closed_by_server"] += 1
                client.close()
    print("idle", " ".join("%s=%d" % kv for kv in sorted(counts.items())), flush=True)


def main(argv):
    mode = argv[1]
    if mode == "load":
        load(float(argv[2]), float(argv[3]), argv[4:])
    elif mode == "idle":
        idle(int(argv[2]), float(argv[3]), int(argv[4]), argv[5])
    else:
        sys.exit("unknown mode %r" % mode)


if __name__ == "__main__":
    main(sys.argv)
