#!/bin/sh
# The vm-test scenarios. Runs inside each VM (from /init), but only needs root, a real kernel,
# memcached, busybox and the agent, so it can be run on a host for debugging:
#   CACHEPROBE=target/release/cacheprobe EXPECT=/tmp/expect MEMCACHED_PORT=21211 \
#   METRICS=127.0.0.1:29150 busybox sh xtask/vm/scenarios.sh
#
# Prints one line per scenario, which the host turns into the result table:
#   CPTEST <scenario> PASS|FAIL <detail>
# and raw material for post-mortems between "CPLOG-BEGIN <what>" and "CPLOG-END <what>".
#
# EXPECT lists what this kernel lacks, written by xtask from agent/tests/fixtures/kernel-*/MISSING:
#   missing <category/event> <first mainline version that has it, or ->

CACHEPROBE=${CACHEPROBE:-/usr/bin/cacheprobe}
MEMCACHED=${MEMCACHED:-memcached}
MEMCACHED_PORT=${MEMCACHED_PORT:-11211}
METRICS=${METRICS:-127.0.0.1:19150}
EXPECT=${EXPECT:-/cptest/expect}
WORK=${WORK:-/tmp/cptest}
# Generous for TCG, where loading the programs runs the verifier on an emulated CPU.
AGENT_START_TIMEOUT=${AGENT_START_TIMEOUT:-120}

SEND=sock/sock_send_length
SERVER=127.0.0.1:$MEMCACHED_PORT

result() {
  scenario=$1 status=$2
  shift 2
  echo "CPTEST $scenario $status $*"
}

dump() {
  echo "CPLOG-BEGIN $1"
  cat "$2" 2>/dev/null
  echo
  echo "CPLOG-END $1"
}

# True when EXPECT says this kernel lacks the tracepoint $1.
lacks() {
  awk -v event="$1" '$1 == "missing" && $2 == event { found = 1 } END { exit !found }' "$EXPECT"
}

# msum FILE METRIC [label=value ...]: sum of the METRIC samples in a Prometheus text scrape whose
# labels include every given pair; 0 when there are none.
msum() { mselect sum "$@"; }

# mcount FILE METRIC [label=value ...]: how many samples match (0 means the series is absent).
mcount() { mselect count "$@"; }

mselect() {
  mode=$1 file=$2 metric=$3
  shift 3
  awk -v mode="$mode" -v metric="$metric" -v wanted="$*" '
    BEGIN { n = split(wanted, pairs, " ") }
    /^#/ || NF < 2 { next }
    {
      series = $0; sub(/[ \t]+[^ \t]+$/, "", series)
      name = series; labels = ""
      brace = index(series, "{")
      if (brace) { name = substr(series, 1, brace - 1); labels = "," substr(series, brace + 1) }
      if (name != metric) next
      for (i = 1; i <= n; i++) {
        eq = index(pairs[i], "=")
        if (!index(labels, "," substr(pairs[i], 1, eq - 1) "=\"" substr(pairs[i], eq + 1) "\"")) next
      }
      sum += $NF
      count++
    }
    END { if (mode == "count") print count + 0; else printf "%.6g\n", sum + 0 }' "$file"
}

# mnonzero FILE REGEX: the non-zero samples whose metric name matches REGEX, on one line
# ("name{labels}=value ..."), for a FAIL detail to say where counts went.
mnonzero() {
  awk -v re="$2" '/^#/ || NF < 2 { next }
    { name = $1; sub(/\{.*/, "", name) }
    name ~ re && $NF + 0 != 0 { series = $0; sub(/[ \t]+[^ \t]+$/, "", series); printf "%s%s=%s", sep, series, $NF; sep = " " }
    END { print "" }' "$1"
}

# Numeric comparisons through awk: busybox test only knows integers.
num_eq() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 == b + 0) }'; }
num_between() { awk -v a="$1" -v lo="$2" -v hi="$3" 'BEGIN { exit !(a + 0 >= lo && a + 0 < hi) }'; }

scrape() {
  # Not wget -T: it crashes in Debian's static busybox 1.35.
  timeout 10 wget -q -O "$1.tmp" "http://$METRICS/metrics" && mv "$1.tmp" "$1"
}

# wait_zero SECONDS FILE METRIC: scrape every half second until the metric's sum is 0 (a missing
# series reads as 0 too: count its series where that matters).
wait_zero() {
  tries=$(($1 * 2))
  until scrape "$2" && num_eq "$(msum "$2" "$3")" 0 || [ "$tries" -le 0 ]; do
    sleep 0.5
    tries=$((tries - 1))
  done
}

# wait_for SECONDS FILE METRIC MINIMUM [label=value ...]: scrape every half second until the sum
# reaches MINIMUM; FILE holds the last scrape either way.
wait_for() {
  seconds=$1 file=$2 metric=$3 minimum=$4
  shift 4
  tries=$((seconds * 2))
  while [ "$tries" -gt 0 ]; do
    if scrape "$file" && awk -v a="$(msum "$file" "$metric" "$@")" -v m="$minimum" 'BEGIN { exit !(a + 0 >= m) }'; then
      return 0
    fi
    sleep 0.5
    tries=$((tries - 1))
  done
  return 1
}

# check_items JSON: one "name<TAB>status<TAB>detail<TAB>impact" line per item of
# `cacheprobe check --json` (serde_json's pretty layout: one key per line, in struct order).
check_items() {
  awk '
    function value(line) { sub(/^[^:]*: "/, "", line); sub(/",?[ \t\r]*$/, "", line); return line }
    /^ *"name": "/   { name = value($0) }
    /^ *"status": "/ { status = value($0) }
    /^ *"detail": "/ { detail = value($0) }
    /^ *"impact": "/ { printf "%s\t%s\t%s\t%s\n", name, status, detail, value($0) }
  ' "$1"
}

# check_verdict ITEMS JSON EXIT_STATUS: "PASS <detail>" or "FAIL <detail>" for the check report
# against EXPECT: what EXPECT lists is reported missing (for the documented reason, with its
# cost), everything else is ok, and the host is usable.
check_verdict() {
  awk -F '\t' -v expect="$EXPECT" -v json="$2" -v rc="$3" '
    # Verifier logs run to kilobytes, with the reason at the end, before the statistics: keep
    # the head and that end. The whole report is in the console log (CPLOG check.json).
    function short(text,   cut) {
      if (length(text) <= 200) return text
      cut = index(text, "\\nverification time")
      if (cut) text = substr(text, 1, cut - 1)
      return substr(text, 1, 80) " ... " substr(text, length(text) - 119)
    }
    BEGIN {
      while ((getline line < expect) > 0) {
        split(line, f, " ")
        if (f[1] == "missing") { missing[f[2]] = 1; since[f[2]] = f[3]; seen[f[2]] = 0; order = order " " f[2] }
      }
      while ((getline line < json) > 0) if (line ~ /"usable": true/) usable = 1
    }
    {
      items++
      name = $1; status = $2; detail = $3; impact = $4
      event = name; sub(/^tracepoint /, "", event)
      if (event in missing) {
        seen[event]++
        if (status != "missing") {
          bad = bad sprintf("; %s is %s, expected missing", name, status)
        } else if (name == event && since[event] != "-" && !index(detail, "not present (needs Linux " since[event] "+)")) {
          bad = bad sprintf("; %s missing for the wrong reason: %s", name, short(detail))
        } else if (name != event && impact == "") {
          bad = bad sprintf("; %s missing without saying what it costs", name)
        }
      } else if (status == "ok") {
        ok++
      } else {
        not_ok++
        not_ok_names = not_ok_names sprintf("%s%s (%s)", not_ok > 1 ? ", " : "", name, status)
        if (not_ok == 1) first_detail = short(detail)
      }
    }
    END {
      if (not_ok == 1) bad = bad sprintf("; %s: %s", not_ok_names, first_detail)
      if (not_ok > 1) bad = bad sprintf("; %d not ok: %s; the first says: %s", not_ok, not_ok_names, first_detail)
      if (items == 0) bad = bad "; no items (check printed no JSON)"
      if (rc != 0) bad = bad sprintf("; exit status %d", rc)
      if (!usable) bad = bad "; not usable"
      n = split(order, events, " ")
      for (i = 1; i <= n; i++) {
        e = events[i]
        if (seen[e] == 0) bad = bad sprintf("; %s not reported", e)
        list = list sprintf("%s%s%s", i > 1 ? ", " : "", e, since[e] != "-" ? " (needs " since[e] "+)" : "")
      }
      if (bad != "") { print "FAIL " substr(bad, 3); exit }
      printf "PASS %d ok, %s\n", ok, n ? "missing as expected: " list : "nothing missing"
    }' "$1"
}

# --- a. check: exactly what this kernel supports -------------------------------------------------
scenario_check() {
  "$CACHEPROBE" check --json --config "$WORK/cacheprobe.toml" >"$WORK/check.json" 2>"$WORK/check.err"
  rc=$?
  dump check.json "$WORK/check.json"
  [ -s "$WORK/check.err" ] && dump check.stderr "$WORK/check.err"
  check_items "$WORK/check.json" >"$WORK/check.items"
  verdict=$(check_verdict "$WORK/check.items" "$WORK/check.json" "$rc")
  if [ ! -s "$WORK/check.items" ] && [ -s "$WORK/check.err" ]; then
    verdict="$verdict; stderr: $(tail -n 1 "$WORK/check.err" | cut -c 1-300)"
  fi
  result check "${verdict%% *}" "${verdict#* }"
}

# --- b. idle disconnect: memcached closes an idle client ----------------------------------------
write_clients() {
  # memcached's idle sweep runs every idle_timeout + 1 s, so its close comes 2 to about 5 s after
  # the last command: rather than sleeping a guess, the clients wait until their end of the
  # connection is in CLOSE_WAIT (0x08 in /proc/net/tcp, remote address 127.0.0.1:<port>).
  peer_closed="awk '\$3 == \"0100007F:$(printf '%04X' "$MEMCACHED_PORT")\" && \$4 == \"08\" { found = 1 } END { exit !found }' /proc/net/tcp"
  # busybox nc -e runs the script with the connection as stdin and stdout.
  # It waits 1.8 s before its set (memcached counts idle time in whole seconds and closes above
  # idle_timeout=2, so not yet), then notes how long it saw the connection idle: idle before
  # close must be measured from that set, not from the open.
  cat >"$WORK/client-idle" <<CLIENT
#!/bin/sh
sleep 1.8
printf 'set k 0 0 1\r\nv\r\n'
read -r reply
replied=\$(cut -d ' ' -f 1 /proc/uptime)
echo "set=\$(echo "\$reply" | tr -d '\r')" >"$WORK/client-idle.out"
tries=0
until $peer_closed || [ \$tries -ge 100 ]; do sleep 0.1; tries=\$((tries + 1)); done
closed=\$(cut -d ' ' -f 1 /proc/uptime)
echo "idle-seen=\$(awk -v a=\$replied -v b=\$closed 'BEGIN { printf "%.2f", b - a }')" >>"$WORK/client-idle.out"
# Stay idle a little longer with the peer's FIN received, as an application would.
sleep 0.5
CLIENT
  cat >"$WORK/client-dead-write" <<CLIENT
#!/bin/sh
printf 'set a 0 0 1\r\n1\r\n'
read -r first
replied=\$(cut -d ' ' -f 1 /proc/uptime)
tries=0
until $peer_closed || [ \$tries -ge 100 ]; do sleep 0.1; tries=\$((tries + 1)); done
closed=\$(cut -d ' ' -f 1 /proc/uptime)
sleep 0.5
printf 'set a 0 0 1\r\n2\r\n'
wrote=\$?
if read -r second; then after="reply"; else after="eof-or-error"; fi
echo "first=\$(echo "\$first" | tr -d '\r') late-write-status=\$wrote then=\$after peer-close-seen-after=\$(awk -v a=\$replied -v b=\$closed 'BEGIN { printf "%.1f", b - a }')s" >"$WORK/client-dead-write.out"
CLIENT
  cat >"$WORK/client-preexisting" <<CLIENT
#!/bin/sh
printf 'set p 0 0 1\r\nv\r\n'
read -r stored
echo "set=\$(echo "\$stored" | tr -d '\r')" >"$WORK/client-preexisting.ready"
# memcached closes connections idle for 2 s: stay busy until the agent runs.
while [ ! -e "$WORK/go" ]; do
  printf 'version\r\n'
  read -r version
  sleep 0.5
done
printf 'get p\r\n'
read -r value
read -r data
read -r end
echo "get=\$(echo "\$data" | tr -d '\r')" >"$WORK/client-preexisting.out"
sleep 1
CLIENT
  cat >"$WORK/client-decode" <<CLIENT
#!/bin/sh
# A scripted text-protocol conversation with a known outcome: 2 stored, 2 hits, 1 miss.
printf 'set d1 0 0 1\r\nv\r\n'
read -r a
printf 'set d2 0 0 1\r\nv\r\n'
read -r b
printf 'get d1\r\n'
read -r v1; read -r x1; read -r e1
printf 'get nope\r\n'
read -r e2
printf 'get d2\r\n'
read -r v3; read -r x3; read -r e3
echo "\$(echo "\$a \$b \$e2" | tr -d '\r')" >"$WORK/client-decode.out"
CLIENT
  chmod +x "$WORK/client-idle" "$WORK/client-dead-write" "$WORK/client-preexisting" "$WORK/client-decode"
}

start_services() {
  cat >"$WORK/cacheprobe.toml" <<CONFIG
[[services]]
name = "memcached"
port = $MEMCACHED_PORT
protocol = "memcache"
CONFIG
  "$MEMCACHED" -u root -l 127.0.0.1 -p "$MEMCACHED_PORT" -t 1 -o idle_timeout=2 &
  MEMCACHED_PID=$!
  # Listening sockets in /proc/net/tcp: local address 0100007F:<port in hex>, state 0A.
  listening=":$(printf '%04X' "$MEMCACHED_PORT") 00000000:0000 0A"
  tries=40
  while [ "$tries" -gt 0 ] && ! grep -q "$listening" /proc/net/tcp; do
    sleep 0.5
    tries=$((tries - 1))
  done
}

# start_agent LOG [CONFIG]: runs the agent in the background (with $WORK/cacheprobe.toml unless
# CONFIG is given) and waits until /metrics answers; on failure AGENT_FAILURE says why.
start_agent() {
  "$CACHEPROBE" run --config "${2:-$WORK/cacheprobe.toml}" --listen "$METRICS" >"$WORK/$1" 2>&1 &
  AGENT_PID=$!
  tries=$((AGENT_START_TIMEOUT * 2))
  while [ "$tries" -gt 0 ]; do
    scrape "$WORK/start.prom" && return 0
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then
      wait "$AGENT_PID"
      AGENT_FAILURE="agent exited with status $? before serving /metrics: $(tail -n 1 "$WORK/$1" | cut -c 1-300)"
      return 1
    fi
    sleep 0.5
    tries=$((tries - 1))
  done
  AGENT_FAILURE="agent did not serve /metrics within ${AGENT_START_TIMEOUT} s"
  return 1
}

scenario_idle() {
  nc 127.0.0.1 "$MEMCACHED_PORT" -e "$WORK/client-idle"
  f=$WORK/idle.prom
  wait_for 30 "$f" cacheprobe_connections_closed_total 2
  dump idle.prom "$f"
  client="role=client server=$SERVER"
  opened_client=$(msum "$f" cacheprobe_connections_opened_total $client)
  opened_server=$(msum "$f" cacheprobe_connections_opened_total role=server server=$SERVER)
  closed_peer=$(msum "$f" cacheprobe_connections_closed_total $client closed_by=peer)
  closed_local=$(msum "$f" cacheprobe_connections_closed_total role=server server=$SERVER closed_by=local)
  idle_sum=$(msum "$f" cacheprobe_connection_idle_before_close_seconds_sum $client closed_by=peer)
  idle_count=$(msum "$f" cacheprobe_connection_idle_before_close_seconds_count $client closed_by=peer)
  send_up=$(msum "$f" cacheprobe_probe_up probe=$SEND)
  send_series=$(mcount "$f" cacheprobe_probe_up probe=$SEND)
  lifecycle_up=$(msum "$f" cacheprobe_probe_up probe=sock/inet_sock_set_state)
  bad=""
  num_eq "$opened_client" 1 || bad="$bad; opened{client}=$opened_client, want 1"
  num_eq "$opened_server" 1 || bad="$bad; opened{server}=$opened_server, want 1"
  num_eq "$closed_peer" 1 || bad="$bad; closed{client,peer}=$closed_peer, want 1"
  num_eq "$closed_local" 1 || bad="$bad; closed{server,local}=$closed_local, want 1"
  num_eq "$idle_count" 1 || bad="$bad; idle_before_close_count{client,peer}=$idle_count, want 1"
  num_between "$idle_sum" 2 10 || bad="$bad; idle_before_close_sum{client,peer}=$idle_sum s, want 2..10"
  # The kernel saw the close before the client's poll did (up to 1 s later on TCG), and the
  # reply before the client's clock read: from the open it would be 1.8 s more.
  idle_seen=$(sed -n 's/^idle-seen=//p' "$WORK/client-idle.out" 2>/dev/null)
  awk -v got="$idle_sum" -v seen="$idle_seen" 'BEGIN { exit !(seen != "" && got >= seen - 1.0 && got <= seen + 0.5) }' ||
    bad="$bad; idle_before_close_sum{client,peer}=$idle_sum s, want the client's own idle time ${idle_seen:-?} s (-1.0 .. +0.5), not from the open"
  num_eq "$lifecycle_up" 1 || bad="$bad; probe_up{inet_sock_set_state}=$lifecycle_up, want 1"
  if lacks $SEND; then
    want_send=0 idle_from="from the kernel's tcp_sock stamps at the close: no send/recv tracepoints"
  else
    want_send=1 idle_from="from the last send/recv"
  fi
  # A present series with value 0 is the precise degradation; an absent one is a silent zero.
  [ "$send_series" = 1 ] || bad="$bad; probe_up{$SEND} has $send_series series, want 1"
  num_eq "$send_up" "$want_send" || bad="$bad; probe_up{$SEND}=$send_up, want $want_send"
  grep -q '^set=STORED$' "$WORK/client-idle.out" 2>/dev/null || bad="$bad; client did not store: $(cat "$WORK/client-idle.out" 2>/dev/null)"
  if [ -z "$bad" ]; then
    result idle-disconnect PASS "opened client=1 server=1; closed client/peer=1 server/local=1;" \
      "idle_before_close=${idle_sum}s ($idle_from; the client saw ${idle_seen}s); probe_up{$SEND}=$send_up"
  else
    result idle-disconnect FAIL "${bad#; }"
  fi
}

# one_dead_write FILE: waits for client-dead-write's write to be counted, then (a second,
# wrongly counted write would show by then) requires exactly one that the client noticed;
# appends to $bad, sets $outcomes.
one_dead_write() {
  wait_for 20 "$1" cacheprobe_dead_socket_writes_total 1
  sleep 2
  scrape "$1"
  total=$(msum "$1" cacheprobe_dead_socket_writes_total)
  unnoticed=$(msum "$1" cacheprobe_dead_socket_writes_total outcome=unnoticed)
  outcomes=$(awk '/^cacheprobe_dead_socket_writes_total\{/ { match($0, /outcome="[^"]*"/); printf "%s%s", sep, substr($0, RSTART + 9, RLENGTH - 10); sep = "," }' "$1")
  num_eq "$total" 1 || bad="$bad; dead_socket_writes_total=$total, want 1"
  num_eq "$unnoticed" 0 || bad="$bad; outcome unnoticed=$unnoticed, want 0 (the client read eof)"
}

# --- c. dead-socket write: a late write onto a connection memcached already closed --------------
scenario_dead_write() {
  nc 127.0.0.1 "$MEMCACHED_PORT" -e "$WORK/client-dead-write"
  f=$WORK/dead.prom
  client_saw=$(cat "$WORK/client-dead-write.out" 2>/dev/null)
  bad=""
  case "$client_saw" in
    "first=STORED late-write-status=0 then=eof-or-error "*) ;;
    *) bad="$bad; the client did not write after the close and see it fail: $client_saw" ;;
  esac
  if lacks $SEND; then
    # No send program: the write is counted from TCP's sequence numbers when the socket leaves
    # CLOSE_WAIT (the reset it drew, or the client's close), once, with its fate unknown.
    wait_for 20 "$f" cacheprobe_dead_socket_writes_total 1
    # A second, wrongly counted write would show up by then.
    sleep 2
    scrape "$f"
    dump dead.prom "$f"
    total=$(msum "$f" cacheprobe_dead_socket_writes_total)
    unknown=$(msum "$f" cacheprobe_dead_socket_writes_total outcome=unknown)
    num_eq "$total" 1 || bad="$bad; dead_socket_writes_total=$total without a send tracepoint, want 1 (from sequence numbers)"
    num_eq "$unknown" 1 || bad="$bad; outcome unknown=$unknown, want 1 (no read tells the fate without a receive tracepoint)"
    awk -F '\t' -v probe="tracepoint $SEND" '
      $1 == probe && $2 == "missing" && index($4, "dead-socket writes only as the socket leaves CLOSE_WAIT") { found = 1 }
      END { exit !found }' "$WORK/check.items" ||
      bad="$bad; check did not report $SEND missing with \"dead-socket writes only as the socket leaves CLOSE_WAIT\""
    detail="dead_socket_writes_total=1 outcome=unknown from sequence numbers: check reports $SEND missing and why"
  else
    one_dead_write "$f"
    dump dead.prom "$f"
    detail="dead_socket_writes_total=1 outcome=$outcomes"
  fi
  if [ -z "$bad" ]; then
    result dead-socket-write PASS "$detail; client: $client_saw"
  else
    result dead-socket-write FAIL "${bad#; }"
  fi
}

# --- e. memcache decoding: a scripted conversation, counted exactly per command and status ------
scenario_decode() {
  # Earlier scenarios sent requests too: count this conversation as the difference. The dead
  # write's set (scenario c) never gets an answer; it finishes as unanswered or timeout some
  # seconds later (request timeout, or its socket's address reused by a new connection), which
  # must not land inside the difference: wait for it first (client sets: idle 1, dead-write 2).
  if ! lacks $SEND; then
    wait_for 10 "$WORK/decode-settle.prom" cacheprobe_memcache_requests_total 3 role=client command=set ||
      echo "decode: the dead write's set did not finish within 10 s" >&2
  fi
  f0=$WORK/decode-before.prom
  scrape "$f0"
  nc 127.0.0.1 "$MEMCACHED_PORT" -e "$WORK/client-decode"
  f=$WORK/decode.prom
  bad=""
  [ "$(cat "$WORK/client-decode.out" 2>/dev/null)" = "STORED STORED END" ] ||
    bad="$bad; client saw: $(cat "$WORK/client-decode.out" 2>/dev/null)"
  if lacks $SEND; then
    # Without the sock length tracepoints the capture programs never learn which syscalls touch
    # watched sockets: no requests are decoded, and check says why.
    sleep 3
    scrape "$f"
    dump decode.prom "$f"
    total=$(msum "$f" cacheprobe_memcache_requests_total)
    num_eq "$total" 0 || bad="$bad; memcache_requests_total=$total without $SEND, want 0"
    detail="no decoding as documented: $SEND missing"
  else
    before=$(msum "$f0" cacheprobe_memcache_requests_total role=client)
    wait_for 20 "$f" cacheprobe_memcache_requests_total "$(awk -v b="$before" 'BEGIN { print b + 5 }')" role=client
    sleep 1
    scrape "$f"
    dump decode.prom "$f"
    delta() { awk -v a="$(msum "$f" "$@")" -v b="$(msum "$f0" "$@")" 'BEGIN { print a - b }'; }
    stored=$(delta cacheprobe_memcache_requests_total role=client command=set status=stored)
    hits=$(delta cacheprobe_memcache_requests_total role=client command=get status=hit)
    misses=$(delta cacheprobe_memcache_requests_total role=client command=get status=miss)
    total=$(delta cacheprobe_memcache_requests_total role=client)
    num_eq "$stored" 2 || bad="$bad; set/stored=$stored, want 2"
    num_eq "$hits" 2 || bad="$bad; get/hit=$hits, want 2"
    num_eq "$misses" 1 || bad="$bad; get/miss=$misses, want 1"
    num_eq "$total" 5 || bad="$bad; client requests=$total, want 5"
    detail="client set/stored=2 get/hit=2 get/miss=1"
  fi
  if [ -z "$bad" ]; then
    result memcache-decoding PASS "$detail"
  else
    result memcache-decoding FAIL "${bad#; }"
  fi
}

# stop_agent: SIGTERM, then the exit status, or 124 after 15 s (the agent is then killed).
stop_agent() {
  kill -TERM "$AGENT_PID"
  tries=30
  while [ "$tries" -gt 0 ] && kill -0 "$AGENT_PID" 2>/dev/null; do
    sleep 0.5
    tries=$((tries - 1))
  done
  if kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -KILL "$AGENT_PID"
    wait "$AGENT_PID"
    return 124
  fi
  wait "$AGENT_PID"
}

scenario_shutdown() {
  stop_agent
  status=$?
  case $status in
    0) result shutdown PASS "exit status 0 after SIGTERM" ;;
    124) result shutdown FAIL "agent still running 15 s after SIGTERM" ;;
    *) result shutdown FAIL "exit status $status after SIGTERM" ;;
  esac
}

# --- d. a connection opened before the agent started --------------------------------------------
# Adoption on first use reads struct sock_common at offsets from this kernel's BTF, from the
# send/recv tracepoints; without them the connection is only met at its close.
scenario_preexisting() {
  rm -f "$WORK/go"
  nc 127.0.0.1 "$MEMCACHED_PORT" -e "$WORK/client-preexisting" &
  client_pid=$!
  tries=40
  while [ "$tries" -gt 0 ] && [ ! -s "$WORK/client-preexisting.ready" ]; do
    sleep 0.5
    tries=$((tries - 1))
  done
  if ! start_agent agent-2.log; then
    result preexisting-connection FAIL "second start: $AGENT_FAILURE"
    kill "$client_pid" "$AGENT_PID" 2>/dev/null
    return
  fi
  touch "$WORK/go"
  active=0
  if ! lacks $SEND; then
    wait_for 10 "$WORK/pre-active.prom" cacheprobe_connections_active 1 role=client server=$SERVER
    active=$(msum "$WORK/pre-active.prom" cacheprobe_connections_active role=client server=$SERVER)
  fi
  wait "$client_pid"
  f=$WORK/pre.prom
  wait_for 15 "$f" cacheprobe_connections_closed_total 1 role=client server=$SERVER
  dump pre.prom "$f"
  stop_agent
  client="role=client server=$SERVER"
  closed_local=$(msum "$f" cacheprobe_connections_closed_total $client closed_by=local)
  closed_all=$(msum "$f" cacheprobe_connections_closed_total $client)
  opened=$(msum "$f" cacheprobe_connections_opened_total $client)
  active_after=$(msum "$f" cacheprobe_connections_active $client)
  idle_sum=$(msum "$f" cacheprobe_connection_idle_before_close_seconds_sum $client closed_by=local)
  idle_count=$(msum "$f" cacheprobe_connection_idle_before_close_seconds_count $client closed_by=local)
  bad=""
  num_eq "$closed_local" 1 || bad="$bad; closed{client,local}=$closed_local, want 1"
  num_eq "$closed_all" 1 || bad="$bad; closed{client}=$closed_all, want 1"
  num_eq "$opened" 0 || bad="$bad; opened{client}=$opened, want 0 (it opened before the agent)"
  num_eq "$active_after" 0 || bad="$bad; active{client}=$active_after after the close, want 0"
  # Either way its idle time comes from the kernel's tcp_sock stamps at the close.
  num_eq "$idle_count" 1 || bad="$bad; idle_before_close_count{client,local}=$idle_count, want 1"
  num_between "$idle_sum" 0.5 3 || bad="$bad; idle_before_close_sum{client,local}=$idle_sum s, want 0.5..3 (the client slept 1 s)"
  if lacks $SEND; then
    seen="met at its close (no send/recv tracepoints to adopt it on first use): idle_before_close=${idle_sum}s"
  else
    num_eq "$active" 1 || bad="$bad; active{client}=$active while open, want 1 (adopted from the start-up socket dump)"
    seen="adopted at start: active=1 while open, idle_before_close=${idle_sum}s"
  fi
  grep -q '^get=v$' "$WORK/client-preexisting.out" 2>/dev/null ||
    bad="$bad; client did not read its key back: $(cat "$WORK/client-preexisting.out" 2>/dev/null)"
  if [ -z "$bad" ]; then
    result preexisting-connection PASS "closed client/local=1, opened=0; $seen"
  else
    result preexisting-connection FAIL "${bad#; }"
  fi
}

# --- f. socket probes on demand (the default with nothing captured) -----------------------------
# With capture off the send/receive programs come off while no watched connection's peer has
# closed, come back on a peer's FIN, and the late write onto the closed connection is counted
# all the same (by the send program once back, or from write_seq). Without the tracepoints
# there is nothing to take off: the write is counted from write_seq as in c.
scenario_on_demand() {
  awk '{ print } $0 == "protocol = \"memcache\"" { print "capture = false" }' "$WORK/cacheprobe.toml" >"$WORK/on-demand.toml"
  if ! start_agent agent-3.log "$WORK/on-demand.toml"; then
    result on-demand FAIL "$AGENT_FAILURE"
    kill "$AGENT_PID" 2>/dev/null
    return
  fi
  f=$WORK/on-demand.prom
  bad=""
  gauge=cacheprobe_send_receive_probes_attached
  if ! lacks $SEND; then
    # The connections found at start are in the tracker by the first decision: none here.
    wait_zero 10 "$f" $gauge
    before=$(msum "$f" $gauge)
    [ "$(mcount "$f" $gauge)" = 1 ] || bad="$bad; $gauge has $(mcount "$f" $gauge) series, want 1"
    num_eq "$before" 0 || bad="$bad; $gauge=$before with every watched connection healthy, want 0"
  fi
  nc 127.0.0.1 "$MEMCACHED_PORT" -e "$WORK/client-dead-write"
  client_saw=$(cat "$WORK/client-dead-write.out" 2>/dev/null)
  case "$client_saw" in
    "first=STORED late-write-status=0 then=eof-or-error "*) ;;
    *) bad="$bad; the client did not write after the close and see it fail: $client_saw" ;;
  esac
  one_dead_write "$f"
  detail="capture off: dead_socket_writes_total=1 outcome=$outcomes"
  if ! lacks $SEND; then
    # Off again once the closed connection is forgotten (10 s after its close, for sends that
    # race it).
    wait_zero 20 "$f" $gauge
    after=$(msum "$f" $gauge)
    num_eq "$after" 0 || bad="$bad; $gauge=$after after the closed connection was gone, want 0"
    # Only a receive program back in time sees the client's read of EOF (or its reset).
    told=$(awk -v eof="$(msum "$f" cacheprobe_dead_socket_writes_total outcome=eof)" \
      -v reset="$(msum "$f" cacheprobe_dead_socket_writes_total outcome=reset)" 'BEGIN { print eof + reset }')
    num_eq "$told" 1 || bad="$bad; outcome eof or reset=$told, want 1 (the programs were not back for the client's read)"
    detail="$detail; send/receive programs attached: $before before the peer's close, $after after"
  fi
  dump on-demand.prom "$f"
  stop_agent
  if [ -z "$bad" ]; then
    result on-demand PASS "$detail"
  else
    result on-demand FAIL "${bad#; }"
  fi
}

# Sourced with CPTEST_FUNCTIONS_ONLY=1 by xtask's unit tests, which exercise the helpers above.
if [ -n "${CPTEST_FUNCTIONS_ONLY:-}" ]; then
  return 0
fi

rm -rf "$WORK"
mkdir -p "$WORK"
write_clients
start_services
scenario_check
if start_agent agent.log; then
  scenario_idle
  scenario_dead_write
  scenario_decode
  scenario_shutdown
else
  for s in idle-disconnect dead-socket-write memcache-decoding shutdown; do
    result $s FAIL "$AGENT_FAILURE"
  done
  kill "$AGENT_PID" 2>/dev/null
fi
dump agent.log "$WORK/agent.log"
# A fresh agent, so that only the connection opened before it counts.
scenario_preexisting
dump agent-2.log "$WORK/agent-2.log"
scenario_on_demand
dump agent-3.log "$WORK/agent-3.log"
kill "$MEMCACHED_PID" 2>/dev/null
wait 2>/dev/null
