//! `cargo xtask vm-test --systemd`: the .deb on a real Debian 12 host whose PID 1 is systemd.
//!
//! mmdebstrap builds the Debian root filesystem once (cached under ~/.cache/cacheprobe/vm-rootfs/,
//! keyed by a hash of its recipe) as a compressed cpio. Each run appends a small second cpio with
//! the freshly built .deb, a second .deb with a higher version and xtask/vm/systemd-scenarios.sh,
//! run by cptest.service after boot. The kernel unpacks both into its root tmpfs and starts
//! systemd from it, so no disk image or kernel module is needed. The scenarios drive the agent
//! only through dpkg, apt and systemctl and print `CPTEST <scenario> PASS|FAIL <numbers>` lines.

use std::{
    fs,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    package,
    setup::install_debian_packages,
    util::{self, run_command, step},
    vm::{self, BootOptions, Kernel, Row, Verdict},
};

/// The scenarios systemd-scenarios.sh reports, in order; a missing line is a failure.
pub const SCENARIOS: &[&str] = &[
    "install", "start", "crash", "reload", "logs", "upgrade", "purge",
];

/// What the root filesystem holds beyond Debian's essential set and apt: systemd as init, the
/// traffic peers, the tools the scenarios read the kernel with.
const ROOTFS_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "memcached",
    "python3-pymemcache",
    "bpftool",
    "curl",
    "procps",
];

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// Run inside the finished root (`$1`): a quiet console and nothing that wakes up on its own.
const CUSTOMIZE: &str = "echo cptest > \"$1/etc/hostname\"; \
     for unit in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
     apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer systemd-timesyncd.service; do \
     ln -sf /dev/null \"$1/etc/systemd/system/$unit\"; done";

/// A VM runs about a minute with KVM; TCG is slower but bounded by this.
const TIMEOUT: Duration = Duration::from_secs(420);

const BOOT: BootOptions = BootOptions {
    // The root filesystem lives in RAM (about 300 MB unpacked).
    memory_mb: "2048",
    timeout: TIMEOUT,
    append: "console=ttyS0 panic=-1 quiet rdinit=/lib/systemd/systemd \
             systemd.show_status=error systemd.journald.forward_to_console=0",
    kvm_if_available: true,
    tcg_single_thread: true,
    network: None,
};

const CPTEST_UNIT: &str = "\
[Unit]
Description=cacheprobe vm-test --systemd scenarios
After=memcached.service sys-kernel-tracing.mount
Wants=memcached.service

[Service]
Type=oneshot
ExecStart=/bin/bash /cptest/systemd-scenarios.sh
StandardOutput=tty
StandardError=journal+console
TTYPath=/dev/ttyS0
";

/// mmdebstrap's arguments; everything that changes the root filesystem is in here, so its hash
/// names the cache entry.
fn mmdebstrap_args() -> Vec<String> {
    let mut args = vec![
        "--variant=apt".to_string(),
        format!("--include={}", ROOTFS_PACKAGES.join(",")),
        "--dpkgopt=path-exclude=/usr/share/man/*".into(),
        "--dpkgopt=path-exclude=/usr/share/doc/*".into(),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright".into(),
        "--dpkgopt=path-exclude=/usr/share/locale/*".into(),
        format!("--customize-hook={CUSTOMIZE}"),
    ];
    args.extend([SUITE.to_string(), "-".to_string(), MIRROR.to_string()]);
    args
}

fn recipe_hash() -> String {
    let mut hasher = DefaultHasher::new();
    // A fixed-key std hasher: stable across runs of the same toolchain, which is all a cache
    // key needs (a new toolchain at worst rebuilds once).
    mmdebstrap_args().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/cacheprobe/vm-rootfs"))
}

/// The cached root filesystem cpio.gz, built when missing; returns it and whether it was built.
fn rootfs() -> anyhow::Result<(PathBuf, bool)> {
    let dir = cache_dir()?.join(format!("{SUITE}-{}", recipe_hash()));
    let archive = dir.join("rootfs.cpio.gz");
    if archive.is_file() {
        eprintln!(
            "xtask: using the cached root filesystem {}",
            archive.display()
        );
        return Ok((archive, false));
    }
    step(&format!(
        "vm-test --systemd: building the Debian {SUITE} root filesystem with mmdebstrap (cached)"
    ));
    fs::create_dir_all(&dir)?;
    let tar = dir.join("rootfs.tar.partial");
    let status = Command::new("mmdebstrap")
        .args(mmdebstrap_args())
        .stdout(fs::File::create(&tar)?)
        .status()
        .context("cannot run mmdebstrap (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("mmdebstrap failed with {status}");
    }
    // tar -> cpio through a scratch directory: the kernel only unpacks newc cpio.
    let unpacked = dir.join("unpacked");
    let _ = fs::remove_dir_all(&unpacked);
    fs::create_dir_all(&unpacked)?;
    run_command(
        Command::new("tar")
            .args(["-x", "--numeric-owner", "-p", "-f"])
            .arg(&tar)
            .arg("-C")
            .arg(&unpacked),
    )?;
    let partial = dir.join("rootfs.cpio.gz.partial");
    cpio_gz(&unpacked, &partial)?;
    fs::remove_dir_all(&unpacked)?;
    fs::remove_file(&tar)?;
    fs::rename(&partial, &archive)?;
    Ok((archive, true))
}

/// `dir` as a gzip'd newc cpio (owners kept: the Debian root has more users than root).
fn cpio_gz(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            "find . -print0 | sort -z | cpio --null -o -H newc --quiet | gzip -1",
        ])
        .current_dir(dir)
        .stdout(fs::File::create(out)?)
        .status()
        .context("cannot run find | cpio | gzip")?;
    if !status.success() {
        bail!("building {} failed with {status}", out.display());
    }
    Ok(())
}

/// The per-run archive: both .debs, the scenarios and the unit that runs them.
fn overlay(work: &Path, release: &str, old: &Path, new: &Path) -> anyhow::Result<PathBuf> {
    let root = work.join("overlay");
    let _ = fs::remove_dir_all(&root);
    vm::write_file(
        &root,
        "/cptest/systemd-scenarios.sh",
        include_str!("../vm/systemd-scenarios.sh"),
        0o755,
    )?;
    vm::write_file(
        &root,
        "/cptest/scenarios.sh",
        include_str!("../vm/scenarios.sh"),
        0o755,
    )?;
    vm::write_file(&root, "/cptest/expect", &vm::expectations(release)?, 0o644)?;
    fs::copy(old, root.join("cptest/old.deb"))?;
    fs::copy(new, root.join("cptest/new.deb"))?;
    vm::write_file(
        &root,
        "/etc/systemd/system/cptest.service",
        CPTEST_UNIT,
        0o644,
    )?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink("../cptest.service", wants.join("cptest.service"))?;
    let out = work.join("overlay.cpio.gz");
    cpio_gz(&root, &out)?;
    Ok(out)
}

/// `--kernel` for `--systemd`: Debian's kernels only (the host's has no Debian userland to match).
pub fn kernels(choice: Option<vm::KernelChoice>) -> anyhow::Result<Vec<Kernel>> {
    Ok(match choice {
        None | Some(vm::KernelChoice::V6_12) => vec![Kernel::Debian6_12],
        Some(vm::KernelChoice::V6_1) => vec![Kernel::Debian6_1],
        Some(vm::KernelChoice::All) => vec![Kernel::Debian6_12, Kernel::Debian6_1],
        Some(vm::KernelChoice::Host) => bail!("vm-test --systemd boots Debian's kernels only"),
    })
}

pub fn vm_test_systemd(kernels: &[Kernel]) -> anyhow::Result<()> {
    let started = Instant::now();
    install_debian_packages(&["qemu-system-x86", "cpio", "mmdebstrap"])?;
    util::require_root("mmdebstrap builds the root filesystem as root")?;
    let work = vm::target_dir().join("vm-cache/systemd");
    fs::create_dir_all(work.join("logs"))?;
    let (rootfs, built) = rootfs()?;
    let rootfs_time = started.elapsed();

    step("vm-test --systemd: the .deb as built and a higher version of it for the upgrade");
    let old = package::package()?;
    let new = package::package_as(Some(&format!("{}+vmtest1", package::version()?)))?;

    let mut rows = Vec::new();
    let mut timings = Vec::new();
    for &kernel in kernels {
        step(&format!("vm-test --systemd: kernel {}", kernel.label()));
        // The systemd matrix has no optional kernel: one that cannot be had fails.
        let prepared = vm::prepare_debian(kernel, &vm::target_dir().join("vm-cache"));
        let prepared = match vm::ready_or_row(kernel, prepared, Verdict::Fail) {
            Ok(prepared) => prepared,
            Err(row) => {
                rows.push(row);
                continue;
            }
        };
        let overlay = overlay(&work, &prepared.release, &old, &new)?;
        // The kernel unpacks concatenated archives in order; the second adds to the first.
        let initrd = work.join(format!("initrd-{}.img", kernel.label()));
        {
            let mut out = fs::File::create(&initrd)?;
            for part in [&rootfs, &overlay] {
                std::io::copy(&mut fs::File::open(part)?, &mut out)?;
            }
        }
        let log = work
            .join("logs")
            .join(format!("{}-console.log", kernel.label()));
        let vm_started = Instant::now();
        let outcome = vm::boot(&prepared, &initrd, &log, &BOOT);
        timings.push((prepared.release.clone(), vm_started.elapsed(), log.clone()));
        match outcome {
            Ok(end) => {
                let console =
                    String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
                rows.extend(vm::parse_console(
                    &prepared.release,
                    &console,
                    end,
                    SCENARIOS,
                ));
            }
            Err(err) => rows.push(Row {
                kernel: prepared.release.clone(),
                scenario: "boot".into(),
                verdict: Verdict::Fail,
                detail: format!("{err:#}"),
            }),
        }
    }

    println!("\n{}", vm::render_table(&rows));
    println!(
        "time: root filesystem {:.1} s ({}), total {:.1} s",
        rootfs_time.as_secs_f64(),
        if built { "built" } else { "cached" },
        started.elapsed().as_secs_f64()
    );
    for (release, took, log) in &timings {
        println!(
            "time: {release:<28} VM (boot, scenarios, poweroff) {:.1} s; console: {}",
            took.as_secs_f64(),
            log.display()
        );
    }
    let failed = rows.iter().filter(|r| r.verdict == Verdict::Fail).count();
    if failed > 0 {
        bail!("vm-test --systemd: {failed} failure(s)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_names_every_package_and_writes_to_stdout() {
        let args = mmdebstrap_args();
        for package in ROOTFS_PACKAGES {
            assert!(args[1].contains(package), "{package}");
        }
        assert_eq!(&args[args.len() - 3..], [SUITE, "-", MIRROR]);
        assert_eq!(recipe_hash(), recipe_hash());
        assert_eq!(recipe_hash().len(), 16);
    }
}
