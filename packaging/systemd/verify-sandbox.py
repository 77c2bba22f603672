#!/usr/bin/env python3
"""Run a real cacheprobe binary with the credentials and system-call filter of cacheprobe.service,
without systemd, and report what it would miss.

  sudo packaging/systemd/verify-sandbox.py [--binary target/release/cacheprobe] [--seconds 8]

What it does, as root:
  1. reads AmbientCapabilities= and the SystemCallFilter= lines of the unit (in order, as systemd
     applies them) and expands the groups with `systemd-analyze syscall-filter`;
  2. runs `cacheprobe check` as an unused uid holding only those capabilities, with no_new_privs
     (setpriv), and fails unless it reports the agent usable;
  3. runs `cacheprobe run` the same way under `strace -f` for a few seconds, scrapes /metrics
     once, stops it (only the process it started), and lists every system call the agent made
     that the unit's filter would refuse.
Re-run it whenever the agent starts touching new parts of the system (procfs sampler, diagnose
socket). It does not reproduce the mount namespace (ProtectSystem=, InaccessiblePaths=, ...).
Exit status: 0 ok, 1 a problem was found, 2 the check could not run. Standard library only.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
UNIT = os.path.join(HERE, "cacheprobe.service")
CONFIG = os.path.join(os.path.dirname(HERE), "config.toml")
UNUSED_UID = 61934  # in the DynamicUser range systemd would pick from; owns no files


def unit_values(unit_text, key):
    return [line.split("=", 1)[1].strip() for line in unit_text.splitlines()
            if line.strip().startswith(key + "=")]


def expand(group, cache={}):
    if not group.startswith("@"):
        return {group}
    if group not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", group],
                             capture_output=True, text=True, check=True).stdout
        names = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                names |= expand(item)
        cache[group] = names
    return cache[group]


def allowed_syscalls(unit_text):
    """The allow-list systemd builds from SystemCallFilter= lines: the first non-~ line starts it,
    later ~ lines remove, later plain lines add."""
    allowed = None
    for value in unit_values(unit_text, "SystemCallFilter"):
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(item)
        if allowed is None:
            if deny:
                raise SystemExit("verify-sandbox: deny-list filters are not supported by this script")
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    if allowed is None:
        raise SystemExit("verify-sandbox: the unit has no SystemCallFilter=")
    return allowed


def setpriv_prefix(caps):
    spec = "-all" + "".join(",+" + cap.lower().removeprefix("cap_") for cap in caps)
    return ["setpriv", f"--reuid={UNUSED_UID}", f"--regid={UNUSED_UID}", "--clear-groups",
            f"--inh-caps={spec}", f"--ambient-caps={spec}", f"--bounding-set={spec}", "--no-new-privs"]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default="target/release/cacheprobe")
    parser.add_argument("--unit", default=UNIT, help="unit file to take credentials and filter from")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to trace `run`")
    parser.add_argument("--port", type=int, default=19157, help="metrics port for the traced run")
    args = parser.parse_args(argv)

    for tool in ("setpriv", "strace", "systemd-analyze"):
        if shutil.which(tool) is None:
            print(f"verify-sandbox: {tool} is required", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("verify-sandbox: run as root (it drops to the unit's credentials itself)", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="cacheprobe-sandbox-")
    try:
        return verify(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def verify(args, workdir):
    os.chmod(workdir, 0o755)
    # The unprivileged uid must be able to execute the binary and read the config.
    binary = os.path.join(workdir, "cacheprobe")
    shutil.copy(args.binary, binary)
    os.chmod(binary, 0o755)
    with open(CONFIG, encoding="utf-8") as handle:
        config_text = re.sub(r'(?m)^listen = .*$', f'listen = "127.0.0.1:{args.port}"', handle.read())
    config = os.path.join(workdir, "config.toml")
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(config_text)
    os.chmod(config, 0o644)

    with open(args.unit, encoding="utf-8") as handle:
        unit_text = handle.read()
    caps = " ".join(unit_values(unit_text, "AmbientCapabilities")).split()
    allowed = allowed_syscalls(unit_text)
    prefix = setpriv_prefix(caps)
    print(f"capabilities: {' '.join(caps)}; {len(allowed)} system calls allowed")
    problems = 0

    check = subprocess.run(prefix + [binary, "check", "--config", config], capture_output=True, text=True)
    verdict = next((line for line in check.stdout.splitlines() if line.startswith("result:")), "no result line")
    print(f"cacheprobe check as uid {UNUSED_UID}: {verdict}")
    if "result: usable" not in verdict:
        print(check.stdout + check.stderr)
        problems += 1

    trace = os.path.join(workdir, "strace.txt")
    agent = subprocess.Popen(["strace", "-f", "-qq", "-o", trace] + prefix + [binary, "run", "--config", config],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    scraped = None
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and agent.poll() is None:
        time.sleep(0.5)
        if scraped is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/metrics", timeout=2) as response:
                    scraped = response.read().decode("utf-8", "replace")
            except OSError:
                pass
    if agent.poll() is None:
        # Stop the agent itself (strace's only child; setpriv exec'd it), not strace: a signalled
        # strace detaches and would leave the agent running. strace exits when its tracee does.
        children_file = f"/proc/{agent.pid}/task/{agent.pid}/children"
        try:
            with open(children_file, encoding="ascii") as handle:
                children = [int(pid) for pid in handle.read().split()]
        except OSError:
            children = []
        for child in children:
            os.kill(child, signal.SIGTERM)
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for child in children:
                os.kill(child, signal.SIGKILL)
            agent.wait()
    stderr = agent.stderr.read() if agent.stderr else ""
    if scraped is None:
        print("run: /metrics never answered; agent output:\n" + stderr[-2000:])
        problems += 1
    else:
        print(f"run: /metrics answered ({len(scraped.splitlines())} lines)")

    used = set()
    refused = []
    exec_seen = False
    with open(trace, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not exec_seen:
                exec_seen = f'execve("{binary}"' in line
            if not exec_seen:
                continue  # setpriv's own calls are not the agent's
            match = re.match(r"^\d+\s+([a-z_0-9]+)\(", line)
            if match:
                used.add(match.group(1))
                if re.search(r"= -1 (EPERM|EACCES)", line):
                    refused.append(line.strip()[:160])
    outside = sorted(used - allowed)
    print(f"run: {len(used)} distinct system calls: {' '.join(sorted(used))}")
    if outside:
        print(f"PROBLEM: refused by the unit's SystemCallFilter: {' '.join(outside)}")
        problems += 1
    else:
        print("run: every system call is inside the unit's SystemCallFilter")
    if refused:
        print("run: calls the kernel refused for lack of privilege (aya feature probes are expected here):")
        for line in refused[:20]:
            print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
