#!/usr/bin/env python3
"""Agent user-space CPU per captured record, two builds side by side (issue 17).

Runs memcached on loopback and, per round, each build's `cacheprobe run` in turn (order
rotated every round) under the same memcaslap load: 90% get / 10% set, 25-byte keys,
256-byte values (the `cargo xtask bench` workload), both ends watched. For each run it reads
the agent's utime+stime from /proc/<pid>/stat and `cacheprobe_capture_calls_total` (one per
followed send or receive) before and after, and prints CPU seconds per million captured
calls, with the load average at the start of the run. Needs root (the agent loads BPF).

Usage: agent_cpu_ab.py --builds A=/path/a,B=/path/b [--budgets 0,25000] [--rounds 5]
                       [--seconds 10] [--port 23411] [--perf OUT_DIR]
--budgets: capture_records_per_second of each arm (0: capture every call; 25000: the
default). --perf: also record a perf profile of the first round's runs into OUT_DIR.
"""

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def scrape(metrics_port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def memcached_ops(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += s.recv(65536)
    stats = dict(
        line.split()[1:3] for line in data.decode().splitlines() if line.startswith("STAT ")
    )
    return int(stats["cmd_get"]) + int(stats["cmd_set"])


def wait_port(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def start_agent(binary, config_path, metrics_port, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [binary, "run", "--config", config_path, "--listen", f"127.0.0.1:{metrics_port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited: {open(log_path).read()[-2000:]}")
        if "probes attached" in open(log_path).read():
            wait_port(metrics_port)
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("agent did not attach in 60 s")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--builds", required=True)
    ap.add_argument("--budgets", default="0,25000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--port", type=int, default=23411)
    ap.add_argument("--metrics-port", type=int, default=23490)
    ap.add_argument("--perf")
    args = ap.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.builds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    scratch = tempfile.mkdtemp(prefix="agent-cpu-ab-")
    memcaslap_cfg = os.path.join(scratch, "memcaslap.cfg")
    with open(memcaslap_cfg, "w") as f:
        f.write("key\n25 25 1\nvalue\n256 256 1\ncmd\n0 0.10\n1 0.90\n")
    memcached = subprocess.Popen(
        ["memcached", "-u", "root", "-t", "2", "-l", "127.0.0.1", "-m", "256", "-U", "0",
         "-p", str(args.port)]
    )
    results = []  # (budget, build, round, cpu_s, calls, ops, seconds, load)
    try:
        wait_port(args.port)
        arms = [(budget, name, path) for budget in budgets for name, path in builds]
        for rnd in range(args.rounds):
            shift = rnd % len(arms)
            for budget, name, path in arms[shift:] + arms[:shift]:
                cfg = os.path.join(scratch, f"agent-{budget}.toml")
                with open(cfg, "w") as f:
                    f.write(
                        f'[[services]]\nname = "bench"\nport = {args.port}\n'
                        f'protocol = "memcache"\ncapture = true\n\n'
                        f"[limits]\ncapture_bytes = 16384\nmax_sockets = 65536\n"
                        f"capture_records_per_second = {budget}\n"
                    )
                log = os.path.join(scratch, f"agent-{name}-{budget}-{rnd}.log")
                agent = start_agent(path, cfg, args.metrics_port, log)
                perf = None
                try:
                    time.sleep(1)
                    load = os.getloadavg()[0]
                    cpu0 = cpu_seconds(agent.pid)
                    calls0 = scrape(args.metrics_port, "cacheprobe_capture_calls_total")
                    ops0 = memcached_ops(args.port)
                    if args.perf and rnd == 0:
                        os.makedirs(args.perf, exist_ok=True)
                        perf = subprocess.Popen(
                            ["perf", "record", "-F", "999", "--call-graph", "dwarf,8192",
                             "-o", os.path.join(args.perf, f"{name}-{budget}.data"),
                             "-p", str(agent.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )
                    started = time.time()
                    out = subprocess.run(
                        ["memcaslap", "-s", f"127.0.0.1:{args.port}", "-t", f"{args.seconds}s",
                         "-c", "32", "-T", "1", "-F", memcaslap_cfg],
                        capture_output=True, text=True, timeout=args.seconds + 60,
                    )
                    elapsed = time.time() - started
                    if out.returncode != 0:
                        raise RuntimeError(f"memcaslap failed: {out.stderr[-2000:]}")
                    time.sleep(1)  # the agent drains what the rings still hold
                    if perf:
                        perf.send_signal(signal.SIGINT)
                        perf.wait()
                    cpu = cpu_seconds(agent.pid) - cpu0
                    calls = scrape(args.metrics_port, "cacheprobe_capture_calls_total") - calls0
                    ops = memcached_ops(args.port) - ops0
                finally:
                    stop(agent)
                row = (budget, name, rnd, cpu, calls, ops, elapsed, load)
                results.append(row)
                print(
                    f"round {rnd + 1} budget {budget} {name}: agent CPU {cpu:.2f} s, "
                    f"{calls / 1e6:.3f} M captured calls, {ops / elapsed:,.0f} ops/s, "
                    f"{cpu / max(calls, 1) * 1e6:.2f} s/M calls, load {load:.2f}",
                    flush=True,
                )
    finally:
        memcached.terminate()
        memcached.wait()
    print()
    print("| budget | build | runs | agent CPU s per M captured calls (median, min-max) "
          "| captured calls/s (median) | ops/s (median) | load average (min-max) |")
    print("|---|---|---|---|---|---|---|")
    for budget in budgets:
        for name, _ in builds:
            rows = [r for r in results if r[0] == budget and r[1] == name]
            per = [r[3] / max(r[4], 1) * 1e6 for r in rows]
            print(
                f"| {budget} | {name} | {len(rows)} | {statistics.median(per):.2f} "
                f"({min(per):.2f}-{max(per):.2f}) "
                f"| {statistics.median([r[4] / r[6] for r in rows]):,.0f} "
                f"| {statistics.median([r[5] / r[6] for r in rows]):,.0f} "
                f"| {min(r[7] for r in rows):.1f}-{max(r[7] for r in rows):.1f} |"
            )
    if len(builds) == 2:
        print()
        print("Paired by round (second build over first):")
        for budget in budgets:
            ratios = []
            for rnd in range(args.rounds):
                pair = [r for r in results if r[0] == budget and r[2] == rnd]
                by = {r[1]: r[3] / max(r[4], 1) for r in pair}
                ratios.append(by[builds[1][0]] / by[builds[0][0]])
            print(
                f"budget {budget}: {builds[1][0]}/{builds[0][0]} CPU per call, median "
                f"{statistics.median(ratios):.3f}, rounds "
                + ", ".join(f"{x:.3f}" for x in ratios)
            )


if __name__ == "__main__":
    sys.exit(main())
