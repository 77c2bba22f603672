#!/usr/bin/python3
"""BPF time per memcache operation with framing-aware capture, by multi-get size and value size.

Needs root, a running memcached on PORT, a `cacheprobe run` watching PORT with capture on and
`capture_records_per_second = 0`, and `sysctl kernel.bpf_stats_enabled=1`. Reads the run time
and run count of the send/receive programs (bpftool) around each scenario; both ends of every
operation are on this host, so each op is seen by four program runs.

Usage: frame_cost.py PORT [OPS]
"""
import json, socket, subprocess, sys, time

port = int(sys.argv[1])
ops = int(sys.argv[2]) if len(sys.argv) > 2 else 2000


def prog_stats():
    progs = json.loads(subprocess.check_output(["bpftool", "prog", "show", "--json"]))
    total_ns = total_runs = 0
    for p in progs:
        if p.get("name", "").endswith(("sock_send_length", "sock_recv_length")):
            total_ns += p.get("run_time_ns", 0)
            total_runs += p.get("run_cnt", 0)
    return total_ns, total_runs


def recv_until(sock, end):
    buf = b""
    while not buf.endswith(end):
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("closed")
        buf += chunk
    return buf


s = socket.create_connection(("127.0.0.1", port))
rows = []
for keys, size in [(1, 100), (10, 100), (100, 100), (1, 10_000), (1, 500_000), (10, 10_000)]:
    names = [b"fc%d" % i for i in range(keys)]
    value = b"v" * size
    for name in names:
        s.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (name, size, value))
        recv_until(s, b"STORED\r\n")
    request = b"get " + b" ".join(names) + b"\r\n"
    n = max(50, ops // max(1, size // 2000))
    before = prog_stats()
    started = time.monotonic()
    for _ in range(n):
        s.sendall(request)
        recv_until(s, b"END\r\n")
    elapsed = time.monotonic() - started
    after = prog_stats()
    ns = after[0] - before[0]
    runs = after[1] - before[1]
    rows.append((keys, size, n, ns / n, ns / max(runs, 1), runs / n))
print("| keys per get | value bytes | gets | BPF ns per get (both ends) | ns per program run | runs per get |")
print("|---|---|---|---|---|---|")
for keys, size, n, per_op, per_run, runs in rows:
    print(f"| {keys} | {size} | {n} | {per_op:.0f} | {per_run:.0f} | {runs:.1f} |")
