//! Booting a VM under QEMU (KVM when it really works, else TCG) and collecting its serial
//! console.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{PreparedKernel, VM_CPUS, VM_MEMORY_MB, VM_TIMEOUT};
use anyhow::{bail, Context as _};

// --- boot ----------------------------------------------------------------------------------------

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEnd {
    /// QEMU exited by itself (poweroff, or a panic with -no-reboot).
    Exited,
    /// Killed at the deadline.
    TimedOut(Duration),
}

/// How to boot a VM: the busybox initramfs of the kernel matrix, or `--systemd`'s Debian.
pub struct BootOptions {
    pub memory_mb: &'static str,
    pub timeout: Duration,
    pub append: &'static str,
    /// KVM when /dev/kvm can be opened, else TCG; the kernel matrix always emulates.
    pub kvm_if_available: bool,
    /// TCG on one host thread for all vCPUs. Multi-threaded TCG sometimes runs a stale
    /// translation of kernel text that another vCPU is patching, and the kernel dies of an
    /// `Oops: int3` early in boot (seen booting Debian's 6.12 with systemd).
    pub tcg_single_thread: bool,
    /// A virtio NIC on a tap device of a network namespace (QEMU then runs inside it); without
    /// one the VM has no network beyond its loopback.
    pub network: Option<Network>,
}

/// Where a VM's NIC is plugged: `tap` (already created, in `netns`), with this MAC address.
#[derive(Debug, Clone)]
pub struct Network {
    pub netns: String,
    pub tap: String,
    pub mac: String,
}

impl BootOptions {
    pub(super) const INITRAMFS: BootOptions = BootOptions {
        memory_mb: VM_MEMORY_MB,
        timeout: VM_TIMEOUT,
        append: "console=ttyS0 panic=-1 quiet",
        kvm_if_available: false,
        // Attaching and detaching probes patches kernel text (tracepoint static keys) while the
        // other vCPU runs: a CI run lost the 6.12 VM during the second agent start that way.
        tcg_single_thread: true,
        network: None,
    };
}

/// Whether KVM really runs this kernel. Opening /dev/kvm is not enough: under some nested
/// hypervisors `-cpu host` aborts (an MSR it cannot set) and other CPU models hang in the BIOS.
/// So the kernel is booted once without a root filesystem: it panics, and with `panic=-1` and
/// `-no-reboot` QEMU exits, which takes a few seconds under working KVM. Asked once a run.
pub(super) fn kvm_usable(vmlinuz: &Path) -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        if fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return false;
        }
        let probe = Command::new("timeout")
            .args([
                "20",
                "qemu-system-x86_64",
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                "256",
            ])
            .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
            .arg(vmlinuz)
            .args(["-append", "console=ttyS0 panic=-1"])
            .stdin(Stdio::null())
            .output();
        let usable = match probe {
            Ok(out) => {
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout).contains("Kernel panic")
            }
            Err(_) => false,
        };
        if !usable {
            eprintln!("xtask: /dev/kvm is there but cannot boot a kernel here; using TCG");
        }
        usable
    })
}

pub fn boot(
    prepared: &PreparedKernel,
    initrd: &Path,
    log: &Path,
    options: &BootOptions,
) -> anyhow::Result<VmEnd> {
    let kvm = options.kvm_if_available && kvm_usable(&prepared.vmlinuz);
    let accel: &[&str] = if kvm {
        &["-accel", "kvm", "-cpu", "host"]
    } else if options.tcg_single_thread {
        &["-accel", "tcg,thread=single"]
    } else {
        &["-accel", "tcg"]
    };
    let timeout = options.timeout;
    eprintln!(
        "xtask: booting {} under QEMU ({}, {VM_CPUS} vCPUs, {} MB, timeout {} s); console: {}",
        prepared.release,
        if kvm { "KVM" } else { "TCG" },
        options.memory_mb,
        timeout.as_secs(),
        log.display()
    );
    let mut child = qemu_command(prepared, initrd, options, accel)
        .spawn()
        .context("cannot start qemu-system-x86_64")?;

    let (console, errors) = read_console(&mut child, log, prepared.release.clone())?;

    let deadline = Instant::now() + timeout;
    let end = loop {
        let exited = match child.try_wait() {
            Ok(exited) => exited,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err).context("cannot wait for QEMU");
            }
        };
        if let Some(status) = exited {
            let _ = console.join();
            let errors = errors.join().unwrap_or_default();
            if !status.success() {
                bail!("QEMU failed with {status}: {}", errors.trim());
            }
            break VmEnd::Exited;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = console.join();
            let _ = errors.join();
            break VmEnd::TimedOut(timeout);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok(end)
}

/// The QEMU command line for `options` (inside the network namespace when the VM has a NIC).
fn qemu_command(
    prepared: &PreparedKernel,
    initrd: &Path,
    options: &BootOptions,
    accel: &[&str],
) -> Command {
    // `ip netns exec` execs QEMU in place, so killing the child kills QEMU.
    let mut command = match &options.network {
        Some(network) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &network.netns, "qemu-system-x86_64"]);
            command
        }
        None => Command::new("qemu-system-x86_64"),
    };
    command
        .args(accel)
        .args(["-m", options.memory_mb, "-smp", VM_CPUS])
        .args(["-nographic", "-no-reboot"]);
    match &options.network {
        Some(network) => command
            .arg("-netdev")
            .arg(format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                network.tap
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=net0,mac={}", network.mac)),
        None => command.args(["-nic", "none"]),
    };
    command
        .arg("-kernel")
        .arg(&prepared.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", options.append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Copies QEMU's console to `log` (showing result lines as they come) and collects its
/// stderr, each on a thread of its own.
fn read_console(
    child: &mut std::process::Child,
    log: &Path,
    release: String,
) -> anyhow::Result<(std::thread::JoinHandle<()>, std::thread::JoinHandle<String>)> {
    let stdout = child.stdout.take().context("no QEMU stdout")?;
    let stderr = child.stderr.take().context("no QEMU stderr")?;
    let mut log_file = fs::File::create(log)?;
    // Copies the console to the log and shows result lines as they come.
    let console = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = log_file.write_all(&line);
            let _ = log_file.write_all(b"\n");
            let text = String::from_utf8_lossy(&line);
            if let Some(at) = text.find("CPTEST") {
                eprintln!("  [{release}] {}", text[at..].trim_end());
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    Ok((console, errors))
}
