#!/bin/busybox sh
# PID 1 of the vm-test initramfs (built by xtask/src/vm/initramfs.rs): mounts what the agent needs, runs
# the scenarios and powers off. Everything goes to the serial console, which the host parses.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tracefs nodev /sys/kernel/tracing
ip link set lo up

# Firmware and the kernel leave partial lines on the console; start on a fresh one.
echo
echo "CPTEST-START $(uname -r) $(nproc) cpus, init at $(cut -d " " -f 1 /proc/uptime) s"
sh /cptest/scenarios.sh
echo "CPTEST-DONE $(uname -r) at $(cut -d " " -f 1 /proc/uptime) s"
sync
poweroff -f
