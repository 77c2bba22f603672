#!/bin/bash
# The `vm-test --systemd` scenarios: run by cptest.service inside a Debian 12 VM whose PID 1 is
# systemd (built by xtask/src/vm_systemd.rs). They install the .deb as a user would and drive the
# agent only through systemctl, dpkg and apt, so what they prove is the package as shipped.
# One line per scenario on the console: CPTEST <scenario> PASS|FAIL <detail>.

# msum, mcount, check_items, check_verdict, dump, result.
CPTEST_FUNCTIONS_ONLY=1 . /cptest/scenarios.sh
set -u

DEB_OLD=/cptest/old.deb
DEB_NEW=/cptest/new.deb
WORK=/tmp/cptest
CONFIG=/etc/cacheprobe/config.toml
METRICS=127.0.0.1:19150
# RestartSec= of the shipped unit; the crash scenario reads it from systemd too.
mkdir -p "$WORK"

scrape() { curl -sf --max-time 5 "http://$METRICS/metrics" -o "$1.tmp" && mv "$1.tmp" "$1"; }
main_pid() { systemctl show -P MainPID cacheprobe.service; }
uptime_s() { cut -d ' ' -f 1 /proc/uptime; }
elapsed() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }'; }

# wait_metrics SECONDS FILE: until /metrics answers.
wait_metrics() {
  local tries=$(($1 * 5))
  while [ "$tries" -gt 0 ]; do
    scrape "$2" && return 0
    sleep 0.2
    tries=$((tries - 1))
  done
  return 1
}

# wait_sum WANT FILE METRIC [label=value ...]: scrapes into FILE until the sum of METRIC over the
# matching samples is WANT, for up to 20 s (events reach the counters after the agent's next
# ring-buffer poll, which an emulated CPU under load delays); prints the last sum.
wait_sum() {
  local want=$1 file=$2 got tries=100
  shift 2
  while :; do
    scrape "$file" && got=$(msum "$file" "$@")
    if num_eq "${got:-0}" "$want" || [ "$tries" = 0 ]; then break; fi
    sleep 0.2
    tries=$((tries - 1))
  done
  echo "${got:-0}"
}

# The BPF program ids a process holds (fdinfo of its bpf-prog fds).
prog_ids() { grep -h '^prog_id:' /proc/"$1"/fdinfo/* 2>/dev/null | awk '{ print $2 }' | sort -un; }
loaded_prog_ids() { bpftool prog show 2>/dev/null | awk -F: '/^[0-9]+:/ { print $1 }' | sort -un; }

# memcache CLIENT_NAME COUNT [wait-file]: COUNT gets over 4 pooled pymemcache connections opened
# at once; with a wait-file the connections are opened (one set each) before it appears and the
# gets come after.
memcache_client() {
  python3 - "$@" <<'PY'
import os, sys, time
from pymemcache.client.base import Client
name, count = sys.argv[1], int(sys.argv[2])
wait = sys.argv[3] if len(sys.argv) > 3 else None
pool = [Client(("127.0.0.1", 11211), connect_timeout=5, timeout=5) for _ in range(4)]
for i, c in enumerate(pool):
    c.set(f"{name}-{i}", b"v")
if wait:
    open(wait + ".ready", "w").close()
    deadline = time.time() + 120
    while not os.path.exists(wait) and time.time() < deadline:
        # memcached keeps these connections; a version call keeps them busy like a pool would
        for c in pool:
            c.version()
        time.sleep(0.5)
hits = 0
for n in range(count):
    if pool[n % 4].get(f"{name}-{n % 4}") == b"v":
        hits += 1
print(hits)
PY
}

# --- install ------------------------------------------------------------------------------------
scenario_install() {
  local out
  if out=$(dpkg -i "$DEB_OLD" 2>&1); then
    result install PASS "dpkg -i $(dpkg-query -W -f '${Package} ${Version}' cacheprobe)"
  else
    result install FAIL "dpkg -i: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
  fi
}

# --- start: the sandboxed unit attaches what `check` predicts and serves /metrics ------------------
scenario_start() {
  local bad="" started pid status cap nnp seccomp uid
  cacheprobe check --json --config "$CONFIG" >"$WORK/check.json" 2>"$WORK/check.err"
  local rc=$?
  check_items "$WORK/check.json" >"$WORK/check.items"
  local verdict
  verdict=$(check_verdict "$WORK/check.items" "$WORK/check.json" "$rc")
  [ "${verdict%% *}" = PASS ] || bad="$bad; check as root: ${verdict#* }"
  started=$(uptime_s)
  systemctl start cacheprobe.service || bad="$bad; systemctl start failed"
  if ! wait_metrics 120 "$WORK/start.prom"; then
    dump journal <(journalctl -u cacheprobe --no-pager -o cat | tail -n 30)
    result start FAIL "${bad#; }; /metrics did not answer within 120 s: $(journalctl -u cacheprobe -o cat --no-pager | tail -n 1)"
    return
  fi
  local up_after
  up_after=$(elapsed "$started")
  pid=$(main_pid)
  status=/proc/$pid/status
  uid=$(awk '/^Uid:/ { print $3 }' "$status")
  cap=$(awk '/^CapEff:/ { print $2 }' "$status")
  nnp=$(awk '/^NoNewPrivs:/ { print $2 }' "$status")
  seccomp=$(awk '/^Seccomp:/ { print $2 }' "$status")
  # CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_PERFMON (38), CAP_BPF (39).
  [ "$cap" = 000000c000080004 ] || bad="$bad; CapEff=$cap, want 000000c000080004"
  [ "$uid" != 0 ] || bad="$bad; runs as uid 0"
  [ "$nnp" = 1 ] || bad="$bad; NoNewPrivs=$nnp"
  [ "$seccomp" = 2 ] || bad="$bad; Seccomp=$seccomp, want 2 (filter)"
  # probe_up for every tracepoint check reported: 1 where check said ok, 0 where missing.
  local probes=0 up=0 down=0 name state want got
  while IFS=$'\t' read -r name state _ _; do
    case $name in "tracepoint "*) ;; *) continue ;; esac
    name=${name#tracepoint }
    want=0
    [ "$state" = ok ] && want=1
    got=$(msum "$WORK/start.prom" cacheprobe_probe_up "probe=$name")
    probes=$((probes + 1))
    if [ "$(mcount "$WORK/start.prom" cacheprobe_probe_up "probe=$name")" != 1 ] || ! num_eq "$got" "$want"; then
      bad="$bad; probe_up{$name}=$got, check predicted $want"
    elif [ "$want" = 1 ]; then up=$((up + 1)); else down=$((down + 1)); fi
  done <"$WORK/check.items"
  [ "$probes" -gt 0 ] || bad="$bad; check reported no tracepoints"
  local hits requests
  hits=$(memcache_client start 100)
  requests=$(wait_sum 100 "$WORK/start2.prom" cacheprobe_memcache_requests_total role=client command=get)
  num_eq "$requests" 100 || bad="$bad; requests_total{client,get}=$requests after 100 gets ($hits hits)"
  if [ -z "$bad" ]; then
    result start PASS "/metrics after ${up_after}s; uid=$uid CapEff=$cap NoNewPrivs=1 Seccomp=2;" \
      "probe_up as check predicted for $probes tracepoints ($up up, $down down); 100 gets -> requests_total{client,get}=$requests"
  else
    dump check.json "$WORK/check.json"
    dump journal <(journalctl -u cacheprobe -o cat --no-pager | head -n 40)
    # The agent's own reason for the first probe it could not attach, e.g. EACCES from
    # perf_event_open under Debian's kernel.perf_event_paranoid=3.
    local reason
    reason=$(journalctl -u cacheprobe -o cat --no-pager | grep -m 1 'probe not attached' | sed -n 's/.* reason="\([^"]*\)".*/\1/p' | cut -c 1-160)
    result start FAIL "${reason:+the agent says: $reason; }${bad#; }"
  fi
}

# --- crash: kill -9, systemd restarts it, old programs go, pooled connections are adopted ---------
scenario_crash() {
  local bad="" old_pid new_pid restart_sec killed restarted old_ids leftover
  restart_sec=$(systemctl show -P RestartUSec cacheprobe.service)
  memcache_client crash 400 "$WORK/crash-go" >"$WORK/crash-client.out" 2>&1 &
  local client=$!
  local tries=100
  while [ ! -e "$WORK/crash-go.ready" ] && [ "$tries" -gt 0 ]; do sleep 0.1; tries=$((tries - 1)); done
  old_pid=$(main_pid)
  old_ids=$(prog_ids "$old_pid" | tr '\n' ' ')
  local cursor
  cursor=$(journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p')
  killed=$(uptime_s)
  kill -9 "$old_pid"
  new_pid=$old_pid
  tries=600
  while [ "$tries" -gt 0 ]; do
    new_pid=$(main_pid)
    [ "$new_pid" != 0 ] && [ "$new_pid" != "$old_pid" ] && break
    sleep 0.1
    tries=$((tries - 1))
  done
  restarted=$(elapsed "$killed")
  if ! wait_metrics 120 "$WORK/crash.prom"; then
    result crash FAIL "no /metrics after the restart (MainPID $old_pid -> $new_pid after ${restarted}s)"
    touch "$WORK/crash-go"
    wait "$client"
    return
  fi
  local serving
  serving=$(elapsed "$killed")
  # Programs are freed once their last reference goes, which the kernel may defer briefly.
  local loaded tries_left=50
  while :; do
    loaded=" $(loaded_prog_ids | tr '\n' ' ')"
    leftover=""
    for id in $old_ids; do
      case $loaded in *" $id "*) leftover="$leftover $id" ;; esac
    done
    [ -z "$leftover" ] || [ "$tries_left" = 0 ] && break
    sleep 0.2
    tries_left=$((tries_left - 1))
  done
  local new_ids
  new_ids=$(prog_ids "$new_pid" | wc -l)
  touch "$WORK/crash-go"
  wait "$client"
  local requests restarts hits
  hits=$(tail -n 1 "$WORK/crash-client.out")
  requests=$(wait_sum 400 "$WORK/crash2.prom" cacheprobe_memcache_requests_total role=client command=get)
  restarts=$(systemctl show -P NRestarts cacheprobe.service)
  [ "$new_pid" != "$old_pid" ] && [ "$new_pid" != 0 ] || bad="$bad; not restarted (MainPID $old_pid -> $new_pid)"
  # systemd's own account of the delay: from the kill (SIGKILL ends the process at once) to the
  # new main process's start as systemd stamped it (CLOCK_MONOTONIC, which /proc/uptime equals
  # in a VM that never suspends). The poll above adds systemctl's own latency, which on an
  # emulated CPU is seconds, so it is only reported.
  local delay start_us
  start_us=$(systemctl show -P ExecMainStartTimestampMonotonic cacheprobe.service)
  delay=$(awk -v s="$start_us" -v k="$killed" 'BEGIN { if (s + 0 > 0) printf "%.2f", s / 1e6 - k }')
  if [ -z "$delay" ]; then
    bad="$bad; systemd reports no start time for the new main process"
  else
    awk -v d="$delay" -v s="${restart_sec%s}" 'BEGIN { exit !(d + 0 >= s - 0.05 && d + 0 <= s + 2) }' || {
      journalctl -u cacheprobe.service -o short-monotonic --no-pager --after-cursor "$cursor" >"$WORK/crash.journal"
      dump crash.journal "$WORK/crash.journal"
      bad="$bad; systemd started the new agent ${delay}s after the kill, RestartSec=$restart_sec"
    }
  fi
  [ "$restarts" = 1 ] || bad="$bad; NRestarts=$restarts, want 1"
  [ -n "$old_ids" ] || bad="$bad; the killed agent held no BPF programs"
  [ -z "$leftover" ] || bad="$bad; programs of the killed agent still loaded:$leftover"
  [ "$new_ids" -gt 0 ] || bad="$bad; the new agent holds no BPF programs"
  [ "$hits" = 400 ] || bad="$bad; client: $(tail -n 2 "$WORK/crash-client.out" | tr '\n' ' ')"
  num_eq "$requests" 400 || bad="$bad; requests_total{client,get}=$requests after 400 gets on 4 pooled connections opened before the kill, want 400"
  if [ -z "$bad" ]; then
    result crash PASS "systemd started the new agent ${delay}s after kill -9 (RestartSec=$restart_sec);" \
      "MainPID $old_pid -> $new_pid seen ${restarted}s after kill -9, /metrics after ${serving}s, NRestarts=1;" \
      "$(echo $old_ids | wc -w) programs of the killed agent all unloaded, new agent holds $new_ids;" \
      "400 gets on 4 connections opened before the kill -> requests_total{client,get}=$requests"
  else
    result crash FAIL "${bad#; }"
  fi
}

# journal_cursor: where the agent's journal ends now, for journal_line.
journal_cursor() { journalctl -u cacheprobe -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }

# journal_line CURSOR TEXT: the agent's first journal line after CURSOR that contains TEXT,
# polled for up to 20 s; empty when none came.
journal_line() {
  local line="" tries=100
  while [ "$tries" -gt 0 ]; do
    line=$(journalctl -u cacheprobe --after-cursor "$1" -o cat --no-pager | grep -m 1 "$2")
    [ -n "$line" ] && break
    sleep 0.2
    tries=$((tries - 1))
  done
  echo "$line"
}

# --- reload: a changed config applies, a broken one is refused and named by line ------------------
scenario_reload() {
  local bad="" pid cursor requests kept line hits
  pid=$(main_pid)
  cp "$CONFIG" "$WORK/config.orig"
  sed -i 's/^name = "memcached"$/name = "cache-reloaded"/' "$CONFIG"
  grep -q '^name = "cache-reloaded"$' "$CONFIG" || bad="$bad; the shipped config has no name = \"memcached\" line to edit"
  cursor=$(journal_cursor)
  local sent
  sent=$(uptime_s)
  systemctl reload cacheprobe.service || bad="$bad; systemctl reload failed"
  # systemctl returns once SIGHUP is sent; the gets wait until the agent says it applied it.
  [ -n "$(journal_line "$cursor" 'config reloaded')" ] ||
    bad="$bad; no 'config reloaded' in the journal 20 s after systemctl reload"
  local took
  took=$(elapsed "$sent")
  hits=$(memcache_client reload 50)
  requests=$(wait_sum 50 "$WORK/reload.prom" cacheprobe_memcache_requests_total service=cache-reloaded role=client command=get)
  num_eq "$requests" 50 || bad="$bad; after the reload (in the journal ${took}s after systemctl reload) 50 gets -> requests_total{service=cache-reloaded,client,get}=$requests ($hits hits)"

  cursor=$(journal_cursor)
  echo 'sample_interval_seconds = "often"' >>"$CONFIG"
  line=$(wc -l <"$CONFIG")
  systemctl reload cacheprobe.service || bad="$bad; systemctl reload (broken config) failed"
  local journal
  journal=$(journal_line "$cursor" 'reload rejected')
  case $journal in
    *"line $line"*) ;;
    "") bad="$bad; no 'reload rejected' in the journal" ;;
    *) bad="$bad; journal does not name line $line: $journal" ;;
  esac
  hits=$(memcache_client kept 50)
  kept=$(wait_sum 100 "$WORK/reload2.prom" cacheprobe_memcache_requests_total service=cache-reloaded role=client command=get)
  num_eq "$kept" 100 || bad="$bad; after the refused reload 50 more gets ($hits hits) -> requests_total{service=cache-reloaded,client,get}=$kept, want 100 (all services: $(msum "$WORK/reload2.prom" cacheprobe_memcache_requests_total role=client command=get))"
  # Where a missing count went: another command or service, a lost record, a decode error.
  case $bad in *requests_total*) bad="$bad; non-zero: $(mnonzero "$WORK/reload2.prom" '^cacheprobe_(memcache_requests_total|memcache_decode_errors_total|events_lost_total|capture_sample_turns_total)$' | sed 's/cacheprobe_//g')" ;; esac
  [ "$(main_pid)" = "$pid" ] || bad="$bad; MainPID changed $pid -> $(main_pid)"
  systemctl is-active -q cacheprobe.service || bad="$bad; not active after the broken reload"
  cp "$WORK/config.orig" "$CONFIG"
  if [ -z "$bad" ]; then
    result reload PASS "renamed service applied (in the journal ${took}s after systemctl reload): 50 gets -> requests_total{service=cache-reloaded}=$requests;" \
      "broken line $line refused, journal: \"$(echo "$journal" | cut -c 1-160)\"; old config kept ($kept), same MainPID $pid"
  else
    result reload FAIL "${bad#; }"
  fi
}

# --- logs: no colour codes in the journal -------------------------------------------------------
scenario_logs() {
  local lines escapes
  lines=$(journalctl -u cacheprobe -o cat --no-pager | wc -l)
  escapes=$(journalctl -u cacheprobe -o cat --no-pager | grep -c $'\x1b')
  if [ "$lines" -gt 0 ] && [ "$escapes" = 0 ]; then
    result logs PASS "$lines journal lines, 0 with ESC"
  else
    dump journal <(journalctl -u cacheprobe -o cat --no-pager | head -n 20 | cat -v)
    result logs FAIL "$lines journal lines, $escapes with ESC"
  fi
}

# --- upgrade: an edited conffile survives, the running agent moves to the new binary --------------
scenario_upgrade() {
  local bad="" out old_pid new_pid version
  systemctl enable -q cacheprobe.service || bad="$bad; systemctl enable failed"
  echo '# edited by vm-test' >>"$CONFIG"
  sed -i 's/^# sample_interval_seconds = 5$/sample_interval_seconds = 7/' "$CONFIG"
  grep -q '^sample_interval_seconds = 7$' "$CONFIG" || bad="$bad; the shipped config has no '# sample_interval_seconds = 5' line to edit"
  local edited
  edited=$(md5sum <"$CONFIG")
  old_pid=$(main_pid)
  if ! out=$(DEBIAN_FRONTEND=noninteractive dpkg -i "$DEB_NEW" 2>&1 </dev/null); then
    bad="$bad; dpkg -i new: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
  fi
  version=$(dpkg-query -W -f '${Version}' cacheprobe)
  [ "$version" = "$(dpkg-deb -f "$DEB_NEW" Version)" ] || bad="$bad; installed version $version"
  [ "$(md5sum <"$CONFIG")" = "$edited" ] || bad="$bad; the edited conffile changed"
  ls /etc/cacheprobe/*.dpkg-* >/dev/null 2>&1 && bad="$bad; leftovers: $(ls /etc/cacheprobe/)"
  wait_metrics 120 "$WORK/upgrade.prom" || bad="$bad; no /metrics after the upgrade"
  new_pid=$(main_pid)
  # The old binary was replaced on disk; an agent still running it shows "(deleted)".
  case $(readlink /proc/"$new_pid"/exe) in
    *deleted*) bad="$bad; MainPID $new_pid still runs the replaced binary (not restarted on upgrade)" ;;
  esac
  systemctl is-enabled -q cacheprobe.service || bad="$bad; no longer enabled"
  if [ -z "$bad" ]; then
    result upgrade PASS "$(dpkg-deb -f "$DEB_OLD" Version) -> $version; edited conffile kept byte for byte;" \
      "agent restarted onto the new binary (MainPID $old_pid -> $new_pid), still enabled"
  else
    result upgrade FAIL "${bad#; }"
  fi
}

# --- purge: binary, unit, config, enablement and state all go -------------------------------------
scenario_purge() {
  local bad="" out left=""
  local pid ids
  pid=$(main_pid)
  ids=$(prog_ids "$pid" | tr '\n' ' ')
  if ! out=$(DEBIAN_FRONTEND=noninteractive apt-get purge -y -q cacheprobe 2>&1 </dev/null); then
    bad="$bad; apt-get purge: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
  fi
  for path in /usr/bin/cacheprobe /lib/systemd/system/cacheprobe.service \
    /usr/lib/systemd/system/cacheprobe.service /etc/cacheprobe \
    /etc/systemd/system/multi-user.target.wants/cacheprobe.service \
    /var/lib/cacheprobe /var/lib/private/cacheprobe /run/cacheprobe /usr/share/cacheprobe \
    /usr/share/doc/cacheprobe; do
    { [ -e "$path" ] || [ -L "$path" ]; } && left="$left $path"
  done
  [ -z "$left" ] || bad="$bad; left behind:$left"
  [ "$pid" != 0 ] && [ -d /proc/"$pid" ] && bad="$bad; agent $pid still running"
  local status
  status=$(dpkg-query -W -f '${db:Status-Status}' cacheprobe 2>/dev/null)
  [ -z "$status" ] || [ "$status" = not-installed ] || bad="$bad; dpkg status: $status"
  local units
  units=$(systemctl list-unit-files --no-legend cacheprobe.service 2>/dev/null | wc -l)
  [ "$units" = 0 ] || bad="$bad; systemd still lists cacheprobe.service"
  local loaded leftover=""
  loaded=" $(loaded_prog_ids | tr '\n' ' ')"
  for id in $ids; do
    case $loaded in *" $id "*) leftover="$leftover $id" ;; esac
  done
  [ -n "$ids" ] || bad="$bad; the agent held no BPF programs before the purge"
  [ -z "$leftover" ] || bad="$bad; its programs still loaded:$leftover"
  if [ -z "$bad" ]; then
    result purge PASS "apt-get purge: binary, unit, /etc/cacheprobe, enablement link, runtime dir gone;" \
      "agent stopped, its $(echo $ids | wc -w) BPF programs unloaded"
  else
    result purge FAIL "${bad#; }"
  fi
}

echo
echo "CPTEST-START $(uname -r) systemd $(systemctl --version | awk 'NR == 1 { print $2 }') at $(uptime_s) s"
scenario_install
if systemctl cat cacheprobe.service >/dev/null 2>&1; then
  scenario_start
  scenario_crash
  scenario_reload
  scenario_logs
  scenario_upgrade
  scenario_purge
fi
echo "CPTEST-DONE $(uname -r) at $(uptime_s) s"
sync
systemctl poweroff --force --force
