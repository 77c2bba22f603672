#!/bin/busybox sh
# PID 1 of each `cargo xtask fleet-test` VM (built by xtask/src/vm_fleet.rs): brings up the NIC
# on the test's private bridge, starts this host's memcached instances and the agent, then serves
# a shell on port 7000 of that bridge for the host to drive the scenarios through, until the host
# asks for poweroff. /cptest/host.env (per VM) says who this host is.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs nodev /sys/kernel/tracing
. /cptest/host.env
hostname "$HOST"
echo
echo "CPFLEET-BOOT $HOST $(uname -r) at $(cut -d " " -f 1 /proc/uptime) s"
for module in $(cat /lib/modules/fleet/ORDER); do
  insmod "/lib/modules/fleet/$module.ko" || echo "CPFLEET-FAIL $HOST insmod $module"
done
ip link set lo up
ip addr add "$IP/24" dev eth0
ip link set eth0 up

for port in $MEMCACHED_PORTS; do
  memcached -u root -l 0.0.0.0 -p "$port" -t 1 $MEMCACHED_OPTIONS >/tmp/memcached-$port.log 2>&1 &
  echo $! >/tmp/memcached-$port.pid
done
for port in $IDLE_TIMEOUT_PORTS; do
  memcached -u root -l 0.0.0.0 -p "$port" -t 1 -o idle_timeout="$IDLE_TIMEOUT" >/tmp/memcached-$port.log 2>&1 &
  echo $! >/tmp/memcached-$port.pid
done

cacheprobe run --config /cptest/agent.toml >/tmp/agent.log 2>&1 &
echo $! >/tmp/agent.pid
tries=360
while [ "$tries" -gt 0 ]; do
  if timeout 10 wget -q -O /tmp/start.prom "http://127.0.0.1:19150/metrics" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$(cat /tmp/agent.pid)" 2>/dev/null; then
    echo "CPFLEET-FAIL $HOST agent exited: $(tail -n 3 /tmp/agent.log | tr '\n' ' ')"
    break
  fi
  sleep 0.5
  tries=$((tries - 1))
done
[ "$tries" -gt 0 ] || echo "CPFLEET-FAIL $HOST agent did not serve /metrics in 180 s"

# The host's control channel: each connection runs the shell script it sends (ending in exit).
nc -ll -p 7000 -e /bin/sh &
echo "CPFLEET-READY $HOST at $(cut -d " " -f 1 /proc/uptime) s"
while [ ! -e /tmp/poweroff ]; do
  sleep 1
done
echo "CPFLEET-LOG-BEGIN $HOST agent.log"
tail -n 40 /tmp/agent.log
echo "CPFLEET-LOG-END $HOST"
echo "CPFLEET-DONE $HOST at $(cut -d " " -f 1 /proc/uptime) s"
sync
poweroff -f
