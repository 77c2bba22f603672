#!/usr/bin/env bash
# Regenerates the kernel layout fixtures under agent/tests/fixtures/kernel-<version>/.
#
# Usage (as root, from anywhere in the repository):
#   xtask/scripts/fetch-tracepoint-formats.sh host
#       Copies the format files from this machine's tracefs into kernel-<major.minor>/ and records
#       the struct sock_common offsets found in /sys/kernel/btf/vmlinux.
#   xtask/scripts/fetch-tracepoint-formats.sh debian 6.1 [--keep-btf]
#       Downloads the newest Debian linux-image-<series>.*-cloud-amd64-unsigned package of that
#       kernel series (apt-get download, no install; `debian 6.12` for 6.12), boots it under QEMU
#       (TCG) with a busybox initramfs whose /init prints the format files between markers on the
#       serial console, and writes them to kernel-<major.minor>/. The kernel's BTF is taken from
#       the .BTF section of the vmlinux inside the vmlinuz; the sock_common offsets are recorded
#       from it with bpftool. --keep-btf also stores that BTF gzipped (about 1.3 MB) as
#       btf-vmlinux.gz, which the BTF parser's tests read; the repository keeps it for 6.1 only.
#
# Needs: apt-get, dpkg-deb, busybox-static, cpio, qemu-system-x86, bpftool, binutils (objcopy),
# python3, and xz-utils/gzip/zstd/lz4 for the kernel payload (Debian's 6.1 uses lz4, 6.12 zstd).
# KVM is not required: the initramfs is tiny and a TCG boot takes a few seconds.
#
# Layout written (mirrors tracefs' events/ tree so tests can read it like the real thing):
#   kernel-X.Y/KERNEL                    uname -r of the kernel the files came from
#   kernel-X.Y/<category>/<event>/format copied verbatim
#   kernel-X.Y/MISSING                   events that kernel does not have, one per line
#   kernel-X.Y/sock_common.txt           "member offset" lines from that kernel's BTF
#   kernel-X.Y/btf-vmlinux.gz            that BTF itself (debian mode with --keep-btf)
set -euo pipefail

EVENTS=(
  sock/inet_sock_set_state sock/sock_send_length sock/sock_recv_length
  tcp/tcp_retransmit_skb tcp/tcp_retransmit_synack tcp/tcp_receive_reset tcp/tcp_send_reset
  tcp/tcp_destroy_sock
)
for call in read write readv writev sendto recvfrom sendmsg recvmsg connect accept4 socket close; do
  EVENTS+=("syscalls/sys_enter_$call" "syscalls/sys_exit_$call")
done
SOCK_COMMON_MEMBERS=(skc_daddr skc_rcv_saddr skc_dport skc_num skc_family skc_state skc_v6_daddr skc_v6_rcv_saddr)

repo_root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
fixtures="$repo_root/agent/tests/fixtures"

# "6.1.0-47-cloud-amd64" / "6.18.44-fc" -> "6.1" / "6.18"
major_minor() { sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"$1"; }

# Prints "member offset" (bytes, or "absent") for each wanted sock_common member found in a BTF
# file (raw BTF or an ELF with a .BTF section). Deliberately independent of the agent's own BTF
# parser: it reads bpftool's raw dump, so the recorded offsets cross-check that parser.
record_sock_common() {
  local btf_file=$1 out=$2
  local raw; raw=$(mktemp)
  bpftool btf dump file "$btf_file" format raw >"$raw"
  python3 - "$raw" "${SOCK_COMMON_MEMBERS[@]}" >"$out" <<'PY'
import re, sys
raw_path, wanted = sys.argv[1], sys.argv[2:]
types = {}  # id -> [kind, name, referenced type id, [(member, type id, bits offset)]]
current = None
head = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(?:.*?\btype_id=(\d+))?")
member = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")
for line in open(raw_path):
    m = head.match(line)
    if m:
        current = [m.group(2), m.group(3), int(m.group(4) or 0), []]
        types[int(m.group(1))] = current
        continue
    m = member.match(line)
    if m and current is not None:
        current[3].append((m.group(1), int(m.group(2)), int(m.group(3))))
def resolve(tid):
    # Modifiers and typedefs carry no layout; follow them to the struct or union.
    while tid in types and types[tid][0] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        tid = types[tid][2]
    return tid
def find(tid, name, base):
    for mname, mtid, bits in types.get(tid, [None, None, None, []])[3]:
        if mname == name:
            return base + bits // 8
        inner = resolve(mtid)
        if mname == "(anon)" and types.get(inner, [""])[0] in ("STRUCT", "UNION"):
            found = find(inner, name, base + bits // 8)
            if found is not None:
                return found
    return None
candidates = [tid for tid, t in types.items() if t[0] == "STRUCT" and t[1] == "sock_common" and t[3]]
for name in wanted:
    off = find(candidates[0], name, 0) if candidates else None
    print(f"{name} {off if off is not None else 'absent'}")
PY
  rm -f "$raw"
}

copy_host() {
  local tracing=/sys/kernel/tracing
  [ -e "$tracing/events" ] || mount -t tracefs nodev "$tracing" 2>/dev/null || tracing=/sys/kernel/debug/tracing
  local release; release=$(uname -r)
  local dest="$fixtures/kernel-$(major_minor "$release")"
  rm -rf "$dest"; mkdir -p "$dest"
  echo "$release" >"$dest/KERNEL"
  : >"$dest/MISSING"
  for ev in "${EVENTS[@]}"; do
    if [ -r "$tracing/events/$ev/format" ]; then
      mkdir -p "$dest/$ev"; cat "$tracing/events/$ev/format" >"$dest/$ev/format"
    else
      echo "$ev" >>"$dest/MISSING"
    fi
  done
  record_sock_common /sys/kernel/btf/vmlinux "$dest/sock_common.txt"
  echo "wrote $dest"
}

# Decompresses the vmlinux ELF out of a bzImage by trying each compressor at each magic offset,
# the approach of the kernel's scripts/extract-vmlinux.
extract_vmlinux() {
  local image=$1 out=$2
  local magic cmd
  for pair in "fd377a585a00:xz -dc" "1f8b08:gzip -dc" "28b52ffd:zstd -dc" "5d000000:xz -F lzma -dc" "02214c18:lz4 -dc"; do
    magic=${pair%%:*}; cmd=${pair#*:}
    for pos in $(od -An -v -tx1 -w1 "$image" | tr -d ' \n' | grep -ob "$magic" | cut -d: -f1); do
      [ $((pos % 2)) -eq 0 ] || continue
      tail -c +$((pos / 2 + 1)) "$image" | $cmd >"$out" 2>/dev/null || true
      if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = "7f454c46" ]; then return 0; fi
    done
  done
  echo "could not find a vmlinux payload in $image" >&2
  return 1
}

boot_debian() {
  local series=$1 keep_btf=${2:-}
  # The dot after the series keeps "6.1" from matching 6.12 packages.
  local pattern="^linux-image-${series//./\\.}\\.[0-9][^ ]*-cloud-amd64-unsigned\$"
  local pkg
  pkg=$(apt-cache search --names-only "$pattern" | cut -d' ' -f1 | sort -V | tail -n1)
  [ -n "$pkg" ] || { echo "no package matches $pattern (run apt-get update?)" >&2; exit 1; }
  local work; work=$(mktemp -d /tmp/tpformats.XXXXXX)
  chmod 755 "$work"  # apt-get download runs as _apt and must be able to write here
  echo "using $pkg in $work"
  (cd "$work" && apt-get download "$pkg" >/dev/null)
  dpkg-deb -x "$work"/*.deb "$work/pkg"
  local vmlinuz; vmlinuz=$(ls "$work"/pkg/boot/vmlinuz-* | head -n1)
  local release=${vmlinuz##*/vmlinuz-}

  # Initramfs: static busybox and an /init that prints each format file between markers.
  local root="$work/initramfs"
  mkdir -p "$root"/{bin,proc,sys,dev}
  cp "$(command -v busybox)" "$root/bin/busybox"
  {
    echo '#!/bin/busybox sh'
    echo '/bin/busybox --install -s /bin'
    echo 'mount -t proc proc /proc; mount -t sysfs sysfs /sys'
    echo 'mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null'
    # Firmware leaves terminal escapes on the console line; start the markers on a fresh line.
    echo 'echo'
    echo "for ev in ${EVENTS[*]}; do"
    echo '  f=/sys/kernel/tracing/events/$ev/format'
    echo '  if [ -r $f ]; then echo "@@@BEGIN $ev"; cat $f; echo "@@@END $ev"; else echo "@@@MISSING $ev"; fi'
    echo 'done'
    echo 'echo "@@@UNAME $(uname -r)"'
    echo 'poweroff -f'
  } >"$root/init"
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

  # quiet + loglevel keep kernel messages from interleaving with the files on the console.
  timeout 600 qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot \
    -kernel "$vmlinuz" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=0" </dev/null | tr -d '\r' >"$work/console.log"

  grep -q '^@@@UNAME ' "$work/console.log" || { echo "boot did not finish; see $work/console.log" >&2; exit 1; }
  local dest="$fixtures/kernel-$(major_minor "$release")"
  rm -rf "$dest"; mkdir -p "$dest"
  echo "$release" >"$dest/KERNEL"
  grep '^@@@MISSING ' "$work/console.log" | cut -d' ' -f2 >"$dest/MISSING" || true
  [ "$(grep -c '^@@@BEGIN ' "$work/console.log")" = "$(grep -c '^@@@END ' "$work/console.log")" ] ||
    { echo "console output is garbled; see $work/console.log" >&2; exit 1; }
  awk -v dest="$dest" '
    /^@@@BEGIN / { ev = $2; out = dest "/" ev "/format"; system("mkdir -p " dest "/" ev); next }
    /^@@@END /   { close(out); out = ""; next }
    out != ""    { print > out }
  ' "$work/console.log"

  extract_vmlinux "$vmlinuz" "$work/vmlinux"
  objcopy -O binary --only-section=.BTF "$work/vmlinux" "$work/btf.raw"
  record_sock_common "$work/btf.raw" "$dest/sock_common.txt"
  if [ "$keep_btf" = --keep-btf ]; then gzip -9 -n -c "$work/btf.raw" >"$dest/btf-vmlinux.gz"; fi
  echo "wrote $dest (work files in $work)"
}

case "${1:-}" in
  host) copy_host ;;
  debian) boot_debian "${2:?kernel series, e.g. 6.1}" "${3:-}" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
