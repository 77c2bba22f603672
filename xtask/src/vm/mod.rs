//! `cargo xtask vm-test`: proves the agent on the kernels users run. Each kernel boots under QEMU
//! (TCG: KVM is not available everywhere this runs) into an initramfs holding the release agent,
//! memcached and busybox; xtask/vm/scenarios.sh asserts real numbers inside the VM and prints one
//! `CPTEST <scenario> PASS|FAIL <detail>` line each on the serial console, which becomes the
//! result table here. The VM has no network beyond its own loopback.
//!
//! Kernels are Debian's cloud images, fetched with `apt-get download` and cached under
//! <target>/vm-cache/kernels/<package>/, plus this machine's own kernel when its vmlinuz is
//! readable. What each kernel is expected to lack comes from agent/tests/fixtures/kernel-*/MISSING,
//! the record of which tracepoints that kernel really has.

mod console;
mod initramfs;
mod kernels;
mod qemu;

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::{
    setup::install_debian_packages,
    util::{self, step},
};

use initramfs::build_initramfs;
use kernels::prepare_host;

pub use console::{parse_console, render_table};
pub use initramfs::{copy_binary, copy_into, initramfs_base, write_cpio_gz, write_file};
pub use kernels::{expectations, prepare_debian};
pub use qemu::{boot, BootOptions, Network, VmEnd};

/// What building and booting the VMs needs. gzip and dpkg-deb are essential on Debian.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "memcached"];

/// Per kernel, from QEMU's start to its exit. A TCG run takes about a minute; a hung VM is killed.
const VM_TIMEOUT: Duration = Duration::from_secs(240);
const VM_MEMORY_MB: &str = "1024";
const VM_CPUS: &str = "2";

/// The scenarios scenarios.sh reports; a missing line is a failure.
pub const SCENARIOS: &[&str] = &[
    "check",
    "idle-disconnect",
    "dead-socket-write",
    "memcache-decoding",
    "shutdown",
    "preexisting-connection",
    "on-demand",
];

/// The first mainline release with a tracepoint, for tracepoints a supported kernel may lack:
/// `cacheprobe check` must give exactly this as the reason.
const TRACEPOINT_SINCE: &[(&str, &str)] = &[
    ("sock/sock_send_length", "6.4"),
    ("sock/sock_recv_length", "6.4"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Debian 12's own 6.1 (no sock_send_length/sock_recv_length).
    Debian6_1,
    /// Debian 12's backported 6.12.
    Debian6_12,
    /// The kernel this machine runs, when its vmlinuz is readable.
    Host,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::Debian6_1, Kernel::Debian6_12, Kernel::Host];

    pub fn label(self) -> &'static str {
        match self {
            Kernel::Debian6_1 => "6.1",
            Kernel::Debian6_12 => "6.12",
            Kernel::Host => "host",
        }
    }

    fn debian_series(self) -> Option<&'static str> {
        match self {
            Kernel::Debian6_1 => Some("6.1"),
            Kernel::Debian6_12 => Some("6.12"),
            Kernel::Host => None,
        }
    }
}

/// `--kernel` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    Host,
    All,
}

impl KernelChoice {
    pub fn kernels(self) -> Vec<Kernel> {
        match self {
            KernelChoice::V6_1 => vec![Kernel::Debian6_1],
            KernelChoice::V6_12 => vec![Kernel::Debian6_12],
            KernelChoice::Host => vec![Kernel::Host],
            KernelChoice::All => Kernel::ALL.to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Not booted, for the reason in the detail.
    Skip,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub kernel: String,
    pub scenario: String,
    pub verdict: Verdict,
    pub detail: String,
}

/// Where and how long each kernel's run took, for the summary.
struct Timing {
    kernel: String,
    prepare: Duration,
    vm: Duration,
    console_log: PathBuf,
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// [`KEPT_MODULES`] from the kernel's package, uncompressed (Debian kernels only).
    pub modules: Option<PathBuf>,
}

/// Modules kept from a Debian kernel package, in an order `insmod` can load them (each after
/// what it needs): the virtio NIC and iptables' `statistic` match, for `cargo xtask fleet-test`.
/// The package has no modules.dep for modprobe; what a kernel builds in (6.12 builds in the
/// virtio core, 6.1 does not) is skipped: `modules/ORDER` lists what was kept, `modules/BUILTIN`
/// the rest.
pub const KEPT_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "x_tables",
    "xt_tcpudp",
    "ip_tables",
    "iptable_filter",
    "xt_statistic",
];

pub enum Preparation {
    Ready(PreparedKernel),
    Skipped { kernel: String, reason: String },
}

/// The prepared kernel, or the table row that says why it cannot boot: a kernel not to be had
/// here gets `skipped` (a SKIP where the matrix allows it, a FAIL where it must run), a failed
/// preparation a FAIL.
pub fn ready_or_row(
    kernel: Kernel,
    prepared: anyhow::Result<Preparation>,
    skipped: Verdict,
) -> Result<PreparedKernel, Row> {
    match prepared {
        Ok(Preparation::Ready(prepared)) => Ok(prepared),
        Ok(Preparation::Skipped { kernel, reason }) => {
            eprintln!("xtask: {kernel}: {reason}");
            Err(Row {
                kernel,
                scenario: "-".into(),
                verdict: skipped,
                detail: reason,
            })
        }
        Err(err) => Err(Row {
            kernel: kernel.label().into(),
            scenario: "prepare".into(),
            verdict: Verdict::Fail,
            detail: format!("{err:#}"),
        }),
    }
}

/// Boots each kernel, runs the scenarios in it and prints the table; fails on any FAIL or on a
/// VM that did not finish. Needs target/release/cacheprobe (`cargo xtask build`).
pub fn vm_test(kernels: &[Kernel]) -> anyhow::Result<()> {
    install_debian_packages(VM_PACKAGES)?;
    let agent = target_dir().join("release/cacheprobe");
    if !agent.is_file() {
        bail!(
            "{} not found: build it first (cargo xtask build)",
            agent.display()
        );
    }
    let cache = target_dir().join("vm-cache");
    fs::create_dir_all(cache.join("logs"))?;

    let mut rows = Vec::new();
    let mut timings = Vec::new();
    for &kernel in kernels {
        test_kernel(kernel, &cache, &agent, &mut rows, &mut timings);
    }

    println!("\n{}", render_table(&rows));
    for timing in &timings {
        println!(
            "time: {:<28} prepare {:>5.1} s, VM (boot, scenarios, poweroff) {:.1} s; console: {}",
            timing.kernel,
            timing.prepare.as_secs_f64(),
            timing.vm.as_secs_f64(),
            timing.console_log.display(),
        );
    }
    let failed = rows
        .iter()
        .filter(|row| row.verdict == Verdict::Fail)
        .count();
    if failed > 0 {
        bail!("vm-test: {failed} failure(s)");
    }
    Ok(())
}

/// One kernel of the matrix: prepare it, build its initramfs, boot it and read its console;
/// adds its rows (a failed step is a row) and, once it booted, its timing.
fn test_kernel(
    kernel: Kernel,
    cache: &Path,
    agent: &Path,
    rows: &mut Vec<Row>,
    timings: &mut Vec<Timing>,
) {
    step(&format!("vm-test: kernel {}", kernel.label()));
    let started = Instant::now();
    let prepared = match kernel {
        Kernel::Host => prepare_host(),
        _ => prepare_debian(kernel, cache),
    };
    let prepared = match ready_or_row(kernel, prepared, Verdict::Skip) {
        Ok(prepared) => prepared,
        Err(row) => {
            rows.push(row);
            return;
        }
    };
    let initrd = cache.join(format!("initramfs-{}.cpio.gz", kernel.label()));
    if let Err(err) = build_initramfs(cache, kernel, &prepared, agent, &initrd) {
        rows.push(Row {
            kernel: prepared.release.clone(),
            scenario: "initramfs".into(),
            verdict: Verdict::Fail,
            detail: format!("{err:#}"),
        });
        return;
    }
    let prepare = started.elapsed();
    let log = cache
        .join("logs")
        .join(format!("{}-console.log", kernel.label()));
    let vm_started = Instant::now();
    let outcome = boot(&prepared, &initrd, &log, &BootOptions::INITRAMFS);
    let vm = vm_started.elapsed();
    timings.push(Timing {
        kernel: prepared.release.clone(),
        prepare,
        vm,
        console_log: log.clone(),
    });
    match outcome {
        Ok(end) => {
            // Firmware and kernel output is not guaranteed to be UTF-8.
            let console = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
            rows.extend(parse_console(&prepared.release, &console, end, SCENARIOS));
        }
        Err(err) => rows.push(Row {
            kernel: prepared.release.clone(),
            scenario: "boot".into(),
            verdict: Verdict::Fail,
            detail: format!("{err:#}"),
        }),
    }
}

/// The cargo target directory, honouring CARGO_TARGET_DIR like cargo does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => util::workspace_root().join(dir),
        _ => util::workspace_root().join("target"),
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// The scrape and check-report helpers of scenarios.sh, run with this machine's sh and awk
    /// (busybox's run them in the VM; both are POSIX).
    fn scenario_helpers(script: &str, files: &[(&str, &str)]) -> String {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("xtask-vm-helpers-{}-{call}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for (name, contents) in files {
            fs::write(dir.join(name), contents).unwrap();
        }
        let scenarios = util::workspace_root().join("xtask/vm/scenarios.sh");
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!(". {}; {script}", scenarios.display()))
            .current_dir(&dir)
            .env("CPTEST_FUNCTIONS_ONLY", "1")
            .env("EXPECT", dir.join("expect"))
            .output()
            .unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    const SCRAPE: &str = "\
# HELP cacheprobe_connections_opened_total Watched TCP connections that reached ESTABLISHED.
# TYPE cacheprobe_connections_opened_total counter
cacheprobe_connections_opened_total{service=\"memcached\",server=\"127.0.0.1:11211\",role=\"client\"} 1
cacheprobe_connections_opened_total{service=\"memcached\",server=\"127.0.0.1:11211\",role=\"server\"} 1
cacheprobe_connections_opened_total{service=\"memcached\",server=\"127.0.0.1:112110\",role=\"client\"} 5
cacheprobe_connection_idle_before_close_seconds_sum{service=\"memcached\",server=\"127.0.0.1:11211\",role=\"client\",closed_by=\"peer\"} 4.512
cacheprobe_probe_up{probe=\"sock/sock_send_length\"} 0
cacheprobe_dead_socket_writes_total{service=\"memcached\",server=\"127.0.0.1:11211\",role=\"client\",comm=\"a b\",outcome=\"eof\",command=\"set\"} 1
";

    #[test]
    fn scrape_sums_match_whole_labels() {
        let out = scenario_helpers(
            "msum s.prom cacheprobe_connections_opened_total role=client server=127.0.0.1:11211; \
             msum s.prom cacheprobe_connections_opened_total; \
             msum s.prom cacheprobe_connection_idle_before_close_seconds_sum closed_by=peer; \
             msum s.prom cacheprobe_dead_socket_writes_total outcome=eof; \
             msum s.prom cacheprobe_dead_socket_writes_total outcome=unnoticed; \
             mcount s.prom cacheprobe_probe_up probe=sock/sock_send_length; \
             mcount s.prom cacheprobe_probe_up probe=sock/sock_recv_length; \
             msum s.prom cacheprobe_connections_opened",
            &[("s.prom", SCRAPE), ("expect", "")],
        );
        assert_eq!(out, "1\n7\n4.512\n1\n0\n1\n0\n0\n");
    }

    fn check_json(send_status: &str, send_impact: &str) -> String {
        format!(
            r#"{{
  "schema_version": 1,
  "kernel": "6.1.0-56-cloud-amd64",
  "items": [
    {{
      "name": "privileges",
      "status": "ok",
      "detail": "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) are effective",
      "impact": ""
    }},
    {{
      "name": "sock/sock_send_length",
      "status": "missing",
      "detail": "tracepoint sock/sock_send_length not present (needs Linux 6.4+): last-activity stamps and byte counts unavailable",
      "impact": ""
    }},
    {{
      "name": "tracepoint sock/sock_send_length",
      "status": "{send_status}",
      "detail": "tracepoint sock/sock_send_length or its fields are not available on this kernel",
      "impact": "{send_impact}"
    }},
    {{
      "name": "tracepoint tcp/tcp_retransmit_skb",
      "status": "ok",
      "detail": "attached",
      "impact": "retransmissions not counted"
    }}
  ],
  "usable": true
}}
"#
        )
    }

    #[test]
    fn check_verdict_accepts_exactly_the_expected_degradation() {
        let verdict = |json: &str, expect: &str, rc: u8| {
            scenario_helpers(
                &format!("check_items c.json > c.items; check_verdict c.items c.json {rc}"),
                &[("c.json", json), ("expect", expect)],
            )
        };
        let degraded = check_json(
            "missing",
            "dead-socket writes only as the socket leaves CLOSE_WAIT",
        );
        assert_eq!(
            verdict(&degraded, "missing sock/sock_send_length 6.4\n", 0),
            "PASS 2 ok, missing as expected: sock/sock_send_length (needs 6.4+)\n"
        );
        assert_eq!(
            verdict(&degraded, "missing sock/sock_send_length 5.9\n", 0),
            "FAIL sock/sock_send_length missing for the wrong reason: tracepoint \
             sock/sock_send_length not present (needs Linux 6.4+): last-activity stamps and \
             byte counts unavailable\n"
        );
        // A failed item's verifier log keeps its head and the reason at its end.
        let verifier_log = format!(
            "verifier rejected tcp_retransmit_skb: Verifier output: {}invalid access to map value\\n\
             R1 max value is outside of the allowed memory range\\nverification time 13573 \
             usec\\nstack depth 120+0",
            "0: (bf) r6 = r1\\n".repeat(30)
        );
        let failed_retransmit_probe = check_json(
            "missing",
            "dead-socket writes only as the socket leaves CLOSE_WAIT",
        )
        .replace(
            "\"detail\": \"attached\"",
            &format!("\"detail\": \"{verifier_log}\""),
        )
        .replace(
            "\"tracepoint tcp/tcp_retransmit_skb\",\n      \"status\": \"ok\"",
            "\"tracepoint tcp/tcp_retransmit_skb\",\n      \"status\": \"failed\"",
        );
        let reason_end = verifier_log.find("\\nverification time").unwrap();
        assert_eq!(
            verdict(
                &failed_retransmit_probe,
                "missing sock/sock_send_length 6.4\n",
                0
            ),
            format!(
                "FAIL tracepoint tcp/tcp_retransmit_skb (failed): {} ... {}\n",
                &verifier_log[..80],
                &verifier_log[reason_end - 120..reason_end]
            )
        );
        assert_eq!(
            verdict(
                &check_json("failed", "x"),
                "missing sock/sock_send_length 6.4\n",
                0
            ),
            "FAIL tracepoint sock/sock_send_length is failed, expected missing\n"
        );
        assert_eq!(
            verdict(
                &check_json("missing", ""),
                "missing sock/sock_send_length 6.4\n",
                0
            ),
            "FAIL tracepoint sock/sock_send_length missing without saying what it costs\n"
        );
        let unexpected = verdict(&degraded, "", 1);
        assert_eq!(
            unexpected,
            "FAIL 2 not ok: sock/sock_send_length (missing), tracepoint sock/sock_send_length \
             (missing); the first says: tracepoint sock/sock_send_length not present (needs \
             Linux 6.4+): last-activity stamps and byte counts unavailable; exit status 1\n"
        );
        assert_eq!(
            verdict("", "missing sock/sock_recv_length 6.4\n", 0),
            "FAIL no items (check printed no JSON); not usable; sock/sock_recv_length not reported\n"
        );
    }
}
