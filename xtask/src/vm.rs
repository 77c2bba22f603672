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

use std::{
    cmp::Ordering,
    fmt, fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    setup::install_debian_packages,
    util::{self, output, run_command, step},
};

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
        step(&format!("vm-test: kernel {}", kernel.label()));
        let started = Instant::now();
        let prepared = match kernel {
            Kernel::Host => prepare_host(),
            _ => prepare_debian(kernel, &cache),
        };
        let prepared = match ready_or_row(kernel, prepared, Verdict::Skip) {
            Ok(prepared) => prepared,
            Err(row) => {
                rows.push(row);
                continue;
            }
        };
        let initrd = cache.join(format!("initramfs-{}.cpio.gz", kernel.label()));
        if let Err(err) = build_initramfs(&cache, kernel, &prepared, &agent, &initrd) {
            rows.push(Row {
                kernel: prepared.release.clone(),
                scenario: "initramfs".into(),
                verdict: Verdict::Fail,
                detail: format!("{err:#}"),
            });
            continue;
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
                let console =
                    String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
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

/// The cargo target directory, honouring CARGO_TARGET_DIR like cargo does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => util::workspace_root().join(dir),
        _ => util::workspace_root().join("target"),
    }
}

// --- kernels -------------------------------------------------------------------------------------

fn prepare_host() -> anyhow::Result<Preparation> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Ok(Preparation::Skipped {
            kernel: format!("host {release}"),
            reason: format!(
                "not booted: {} does not exist on this machine; the host kernel is covered by \
                 the root integration tests of `cargo xtask test` instead",
                vmlinuz.display()
            ),
        });
    }
    Ok(Preparation::Ready(PreparedKernel {
        release,
        vmlinuz,
        modules: None,
    }))
}

/// `apt-cache search` pattern for a series' cloud kernel image; the dot after the series keeps
/// 6.1 from matching 6.12.
fn package_pattern(series: &str) -> String {
    format!(
        "^linux-image-{}\\.[0-9][^ ]*-cloud-amd64-unsigned$",
        series.replace('.', "\\.")
    )
}

/// The newest package of `series` in `apt-cache search` output ("name - description" lines).
fn newest_package(series: &str, search_output: &str) -> Option<String> {
    let prefix = format!("linux-image-{series}.");
    search_output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix) && name.ends_with("-cloud-amd64-unsigned"))
        .max_by(|a, b| version_cmp(a, b))
        .map(str::to_string)
}

/// Orders names like `sort -V`: digit runs compare as numbers, everything else as text.
fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (digits(a), digits(b));
                let trim = |s: &[u8]| -> Vec<u8> {
                    s.iter().copied().skip_while(|&c| c == b'0').collect()
                };
                let (da, db) = (trim(&a[..na]), trim(&b[..nb]));
                let order = da.len().cmp(&db.len()).then_with(|| da.cmp(&db));
                if order != Ordering::Equal {
                    return order;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn search_packages(series: &str) -> Option<String> {
    let listing = output(
        "apt-cache",
        &["search", "--names-only", &package_pattern(series)],
    )?;
    newest_package(series, &listing)
}

pub fn prepare_debian(kernel: Kernel, cache: &Path) -> anyhow::Result<Preparation> {
    let series = kernel.debian_series().context("not a Debian kernel")?;
    let kernels = cache.join("kernels");
    fs::create_dir_all(&kernels)?;
    let package = match search_packages(series) {
        Some(package) => Some(package),
        None => {
            step("apt-cache knows no such kernel: apt-get update");
            run_command(Command::new("apt-get").args(["update", "-qq"]))
                .map_err(|err| eprintln!("xtask: {err:#}"))
                .ok();
            search_packages(series)
        }
    };
    let package = match package {
        Some(package) => package,
        None => {
            // Offline with a stale package list: the newest kernel fetched before still proves
            // the series.
            let cached = cached_package(&kernels, series)?.with_context(|| {
                format!(
                    "no package matches {} and none is cached",
                    package_pattern(series)
                )
            })?;
            eprintln!("xtask: apt knows no {series} cloud kernel; using the cached {cached}");
            cached
        }
    };
    let dir = kernels.join(&package);
    // A cache entry from before modules were kept is fetched again.
    if !dir.join("READY").is_file() || !modules_complete(&dir) {
        if let Err(err) = download_kernel(&package, &dir) {
            match cached_package(&kernels, series)? {
                Some(cached) if cached != package => {
                    eprintln!("xtask: cannot fetch {package} ({err:#}); using the cached {cached}");
                    return load_cached(&kernels.join(cached));
                }
                _ => return Err(err),
            }
        }
    } else {
        eprintln!("xtask: using cached {package}");
    }
    load_cached(&dir)
}

/// The newest completely fetched package of `series` in the cache.
fn cached_package(kernels: &Path, series: &str) -> anyhow::Result<Option<String>> {
    let mut names = String::new();
    for entry in fs::read_dir(kernels)?.filter_map(Result::ok) {
        if entry.path().join("READY").is_file() && modules_complete(&entry.path()) {
            names.push_str(&entry.file_name().to_string_lossy());
            names.push('\n');
        }
    }
    Ok(newest_package(series, &names))
}

fn load_cached(dir: &Path) -> anyhow::Result<Preparation> {
    let release = fs::read_to_string(dir.join("RELEASE"))
        .with_context(|| format!("{} has no RELEASE", dir.display()))?
        .trim()
        .to_string();
    Ok(Preparation::Ready(PreparedKernel {
        release,
        vmlinuz: dir.join("vmlinuz"),
        modules: Some(dir.join("modules")),
    }))
}

/// Downloads and unpacks a kernel package, keeping only the vmlinuz and [`KEPT_MODULES`]. Works in a .partial
/// directory renamed into place at the end, so an interrupted fetch is redone.
fn download_kernel(package: &str, dir: &Path) -> anyhow::Result<()> {
    step(&format!("fetching {package}"));
    // Not with_extension: package names are full of dots.
    let partial = dir.with_file_name(format!("{package}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial)?;
    }
    fs::create_dir_all(&partial)?;
    let mut download = Command::new("apt-get");
    download.current_dir(&partial).arg("download").arg("-q");
    if util::is_root() {
        // The _apt sandbox user cannot write into root's target directory.
        download.args(["-o", "APT::Sandbox::User=root"]);
    }
    run_command(download.arg(package))?;
    let deb = fs::read_dir(&partial)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("apt-get download produced no .deb")?;
    let unpacked = partial.join("unpacked");
    run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;

    let boot = unpacked.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/", package))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    let release = vmlinuz
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("vmlinuz-"))
        .context("vmlinuz name is not UTF-8")?
        .to_string();
    fs::rename(&vmlinuz, partial.join("vmlinuz"))?;
    keep_modules(
        &unpacked.join("lib/modules").join(&release),
        &partial.join("modules"),
    )?;
    fs::write(partial.join("RELEASE"), format!("{release}\n"))?;
    fs::remove_dir_all(&unpacked)?;
    fs::remove_file(&deb)?;
    fs::write(partial.join("READY"), format!("{package}\n"))?;
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::rename(&partial, dir)?;
    Ok(())
}

/// Copies [`KEPT_MODULES`] out of an unpacked `lib/modules/<release>` as plain `.ko` files
/// (Debian's 6.12 packages compress them with xz, 6.1's do not), skipping those the kernel
/// has built in, and writes their load order to `ORDER`.
fn keep_modules(tree: &Path, into: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(into)?;
    let builtin = fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |module: &str| {
        builtin
            .lines()
            .any(|line| line.rsplit('/').next() == Some(&format!("{module}.ko")))
    };
    let mut order = String::new();
    let mut builtin_ones = String::new();
    let mut found = std::collections::BTreeMap::new();
    let mut pending = vec![tree.join("kernel")];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(Result::ok)
        {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let (stem, compressed) = match name.strip_suffix(".ko.xz") {
                Some(stem) => (stem.to_string(), true),
                None => match name.strip_suffix(".ko") {
                    Some(stem) => (stem.to_string(), false),
                    None => continue,
                },
            };
            if KEPT_MODULES.contains(&stem.as_str()) {
                found.insert(stem, (path, compressed));
            }
        }
    }
    for module in KEPT_MODULES {
        let Some((path, compressed)) = found.get(*module) else {
            if is_builtin(module) {
                builtin_ones.push_str(module);
                builtin_ones.push('\n');
                continue;
            }
            bail!("{} has no module {module}", tree.display());
        };
        order.push_str(module);
        order.push('\n');
        let target = into.join(format!("{module}.ko"));
        if *compressed {
            let plain = Command::new("xz")
                .arg("-dc")
                .arg(path)
                .output()
                .context("cannot run xz")?;
            if !plain.status.success() {
                bail!("xz -dc {} failed", path.display());
            }
            fs::write(&target, plain.stdout)?;
        } else {
            fs::copy(path, &target)?;
        }
    }
    fs::write(into.join("ORDER"), order)?;
    fs::write(into.join("BUILTIN"), builtin_ones)?;
    Ok(())
}

/// Whether a cached kernel has every module of [`KEPT_MODULES`] kept or known built in (an
/// entry from before a module was added to the list is fetched again).
fn modules_complete(dir: &Path) -> bool {
    let read = |name: &str| fs::read_to_string(dir.join("modules").join(name)).ok();
    let (Some(order), Some(builtin)) = (read("ORDER"), read("BUILTIN")) else {
        return false;
    };
    KEPT_MODULES.iter().all(|module| {
        order
            .lines()
            .chain(builtin.lines())
            .any(|line| line == *module)
    })
}

// --- expectations --------------------------------------------------------------------------------

/// "6.1.0-56-cloud-amd64" -> "6.1"; "6.12.117+deb12-cloud-amd64" -> "6.12".
fn major_minor(release: &str) -> Option<String> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().filter(|p| !p.is_empty())?;
    let minor = parts.next().filter(|p| !p.is_empty())?;
    Some(format!("{major}.{minor}"))
}

/// The /cptest/expect file for a release: one `missing <event> <since|->` line per tracepoint
/// its fixture records as absent.
pub fn expectations(release: &str) -> anyhow::Result<String> {
    let series = major_minor(release)
        .with_context(|| format!("cannot tell the version of kernel {release}"))?;
    let fixture = util::workspace_root()
        .join("agent/tests/fixtures")
        .join(format!("kernel-{series}"))
        .join("MISSING");
    let missing = match fs::read_to_string(&fixture) {
        Ok(text) => text,
        Err(_) => {
            eprintln!(
                "xtask: no {}: expecting every probe to work on {release}",
                fixture.display()
            );
            String::new()
        }
    };
    // No `perf_event_paranoid` line, on Debian's kernels either (paranoid 3 by default, which
    // refuses perf_event_open without CAP_SYS_ADMIN): with their BTF every probe attaches
    // through a bpf() link (tp_btf, raw tracepoint), which that setting does not gate, so
    // `check` predicts no refusal. Should one fall back to its classic tracepoint, the line
    // comes back and, unexpected, fails the check scenario.
    Ok(expectations_from_missing(&missing))
}

fn expectations_from_missing(missing: &str) -> String {
    let mut expect = String::new();
    for event in missing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let since = TRACEPOINT_SINCE
            .iter()
            .find(|(name, _)| *name == event)
            .map_or("-", |(_, since)| since);
        expect.push_str(&format!("missing {event} {since}\n"));
    }
    expect
}

// --- initramfs -----------------------------------------------------------------------------------

/// Shared libraries `ldd` lists for a binary, the dynamic loader included.
fn parse_ldd(listing: &str) -> Vec<PathBuf> {
    listing
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, target)) => target.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

pub fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("cannot run ldd on {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&listing.stdout);
    if !listing.status.success() {
        // Statically linked binaries need nothing.
        if stdout.contains("not a dynamic executable")
            || String::from_utf8_lossy(&listing.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {stdout}", binary.display());
    }
    if stdout.contains("not found") {
        bail!("ldd {}: missing libraries:\n{stdout}", binary.display());
    }
    Ok(parse_ldd(&stdout))
}

/// Copies `source` to the same absolute path under `root` (following symlinks).
pub fn copy_into(root: &Path, source: &Path, at: &Path) -> anyhow::Result<()> {
    let relative = at.strip_prefix("/").unwrap_or(at);
    let target = root.join(relative);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(source, &target)
        .with_context(|| format!("cannot copy {} into the initramfs", source.display()))?;
    Ok(())
}

pub fn write_file(root: &Path, at: &str, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let target = root.join(at.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&target, contents)?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{program} not found in PATH"))
}

/// Copies `binary` to `at` under `root`, with the shared libraries it needs at their own paths.
pub fn copy_binary(root: &Path, binary: &Path, at: &Path) -> anyhow::Result<()> {
    copy_into(root, binary, at)?;
    for library in shared_libraries(binary)? {
        copy_into(root, &library, &library)?;
    }
    Ok(())
}

/// A fresh initramfs tree at `root` with what every VM of this crate runs: busybox, the agent,
/// memcached and a root user. The caller adds its /init and scenarios.
pub fn initramfs_base(root: &Path, agent: &Path) -> anyhow::Result<()> {
    if root.exists() {
        fs::remove_dir_all(root)?;
    }
    for dir in [
        "bin", "usr/bin", "proc", "sys", "dev", "tmp", "etc", "cptest",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    // Debian's busybox-static is the statically linked one; the dynamic `busybox` package would
    // have replaced it.
    copy_into(root, Path::new("/bin/busybox"), Path::new("/bin/busybox"))?;
    copy_binary(root, agent, Path::new("/usr/bin/cacheprobe"))?;
    copy_binary(root, &which("memcached")?, Path::new("/usr/bin/memcached"))?;
    // memcached -u root looks root up.
    write_file(root, "/etc/passwd", "root:x:0:0:root:/:/bin/sh\n", 0o644)?;
    write_file(root, "/etc/group", "root:x:0:\n", 0o644)?;
    Ok(())
}

/// `root` as a gzip'd newc cpio owned by root, which the kernel unpacks as its root filesystem.
pub fn write_cpio_gz(root: &Path, out: &Path) -> anyhow::Result<()> {
    let archive = fs::File::create(out)?;
    let status = Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            "find . -print0 | sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1",
        ])
        .current_dir(root)
        .stdout(archive)
        .status()
        .context("cannot run find | cpio | gzip")?;
    if !status.success() {
        bail!("building {} failed with {status}", out.display());
    }
    let size = fs::metadata(out)?.len();
    eprintln!(
        "xtask: initramfs {} ({:.1} MB)",
        out.display(),
        size as f64 / 1e6
    );
    Ok(())
}

fn build_initramfs(
    cache: &Path,
    kernel: Kernel,
    prepared: &PreparedKernel,
    agent: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let root = cache.join("initramfs").join(kernel.label());
    initramfs_base(&root, agent)?;
    write_file(&root, "/init", include_str!("../vm/init.sh"), 0o755)?;
    write_file(
        &root,
        "/cptest/scenarios.sh",
        include_str!("../vm/scenarios.sh"),
        0o755,
    )?;
    write_file(
        &root,
        "/cptest/expect",
        &expectations(&prepared.release)?,
        0o644,
    )?;
    write_cpio_gz(&root, out)
}

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
    const INITRAMFS: BootOptions = BootOptions {
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
fn kvm_usable(vmlinuz: &Path) -> bool {
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
    let mut child = command
        .arg("-kernel")
        .arg(&prepared.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", options.append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;

    let stdout = child.stdout.take().context("no QEMU stdout")?;
    let stderr = child.stderr.take().context("no QEMU stderr")?;
    let mut log_file = fs::File::create(log)?;
    let release = prepared.release.clone();
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

/// Turns a console log into one row per scenario, plus a failure row when the VM did not reach
/// the end of the scenarios. Kernel messages may share the console, so markers are found
/// anywhere in a line.
pub fn parse_console(release: &str, console: &str, end: VmEnd, scenarios: &[&str]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut done = false;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        let Some(at) = line.find("CPTEST") else {
            continue;
        };
        let marker = &line[at..];
        if marker.starts_with("CPTEST-DONE") {
            done = true;
            continue;
        }
        let Some(rest) = marker.strip_prefix("CPTEST ") else {
            continue;
        };
        let (scenario, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let (status, detail) = rest.split_once(' ').unwrap_or((rest, ""));
        let verdict = match status {
            "PASS" => Verdict::Pass,
            _ => Verdict::Fail,
        };
        let detail = if matches!(status, "PASS" | "FAIL") {
            truncate(detail.trim(), MAX_DETAIL)
        } else {
            truncate(&format!("unreadable result line: {marker}"), MAX_DETAIL)
        };
        rows.push(Row {
            kernel: release.to_string(),
            scenario: scenario.to_string(),
            verdict,
            detail,
        });
    }
    for scenario in scenarios {
        if !rows.iter().any(|row| row.scenario == *scenario) {
            rows.push(Row {
                kernel: release.to_string(),
                scenario: scenario.to_string(),
                verdict: Verdict::Fail,
                detail: "no result".into(),
            });
        }
    }
    if !done {
        rows.push(Row {
            kernel: release.to_string(),
            scenario: "vm".into(),
            verdict: Verdict::Fail,
            detail: match end {
                VmEnd::TimedOut(after) => {
                    format!("did not finish: killed after {} s", after.as_secs())
                }
                VmEnd::Exited => match kernel_death(console) {
                    Some(why) => truncate(
                        &format!("VM stopped before the scenarios finished: {why}"),
                        MAX_DETAIL,
                    ),
                    None => "VM stopped before the scenarios finished".into(),
                },
            },
        });
    }
    rows
}

/// The first line of a kernel death on the console (CI keeps only the table, not the log).
fn kernel_death(console: &str) -> Option<&str> {
    const SIGNS: [&str; 4] = ["Kernel panic", "Oops", "BUG:", "general protection fault"];
    console
        .lines()
        .map(|line| line.trim_end_matches('\r'))
        .find_map(|line| {
            let at = SIGNS.iter().filter_map(|sign| line.find(sign)).min()?;
            Some(&line[at..])
        })
}

/// Longest detail shown in the table; the console log has everything.
const MAX_DETAIL: usize = 600;

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}... (truncated; see the console log)", &text[..cut]),
        None => text.to_string(),
    }
}

pub fn render_table(rows: &[Row]) -> String {
    let headers = ["kernel", "scenario", "result", "detail"];
    let kernel_width = rows
        .iter()
        .map(|row| row.kernel.len())
        .chain([headers[0].len()])
        .max()
        .unwrap_or(0);
    let scenario_width = rows
        .iter()
        .map(|row| row.scenario.len())
        .chain([headers[1].len()])
        .max()
        .unwrap_or(0);
    let mut table = format!(
        "{:<kernel_width$}  {:<scenario_width$}  {:<6}  {}\n",
        headers[0], headers[1], headers[2], headers[3]
    );
    for row in rows {
        table.push_str(&format!(
            "{:<kernel_width$}  {:<scenario_width$}  {:<6}  {}\n",
            row.kernel,
            row.scenario,
            row.verdict.to_string(),
            row.detail
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_like_sort_v() {
        assert_eq!(
            version_cmp(
                "linux-image-6.1.0-9-cloud-amd64-unsigned",
                "linux-image-6.1.0-10-cloud-amd64-unsigned"
            ),
            Ordering::Less
        );
        assert_eq!(
            version_cmp("6.12.117+deb12", "6.12.115+deb12"),
            Ordering::Greater
        );
        assert_eq!(version_cmp("6.1.0-056", "6.1.0-56"), Ordering::Equal);
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
    }

    #[test]
    fn newest_package_of_the_series_only() {
        let listing = "\
linux-image-6.1.0-55-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-9-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.12.115+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.200+deb12-cloud-amd64-unsigned-dbg - debug symbols
";
        assert_eq!(
            newest_package("6.1", listing).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(
            newest_package("6.12", listing).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(newest_package("6.6", listing), None);
        assert_eq!(
            package_pattern("6.1"),
            "^linux-image-6\\.1\\.[0-9][^ ]*-cloud-amd64-unsigned$"
        );
    }

    #[test]
    fn release_series() {
        assert_eq!(major_minor("6.1.0-56-cloud-amd64").as_deref(), Some("6.1"));
        assert_eq!(
            major_minor("6.12.117+deb12-cloud-amd64").as_deref(),
            Some("6.12")
        );
        assert_eq!(major_minor("6.18.44-fc-v669").as_deref(), Some("6.18"));
        assert_eq!(major_minor("garbage"), None);
    }

    #[test]
    fn expectations_come_from_the_fixtures() {
        assert_eq!(
            expectations("6.1.0-56-cloud-amd64").unwrap(),
            "missing sock/sock_send_length 6.4\nmissing sock/sock_recv_length 6.4\n"
        );
        assert_eq!(expectations("6.12.117+deb12-cloud-amd64").unwrap(), "");
        assert!(!expectations("6.18.44-fc-v669")
            .unwrap()
            .contains("perf_event_paranoid"));
        assert_eq!(
            expectations_from_missing("tcp/tcp_destroy_sock\n\n"),
            "missing tcp/tcp_destroy_sock -\n"
        );
    }

    #[test]
    fn ldd_listing_gives_libraries_and_loader() {
        let listing = "\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007fcd)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fcd)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fcd)
";
        assert_eq!(
            parse_ldd(listing),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn console_rows_per_scenario() {
        let console = "\
\x1b[2J SeaBIOS noise
CPTEST-START 6.1.0-56-cloud-amd64 2 cpus\r
CPTEST check PASS 24 ok, missing as expected: sock/sock_send_length (needs 6.4+)\r
[    9.1] random: crng init done CPTEST idle-disconnect PASS idle_before_close=4.5s
CPTEST dead-socket-write FAIL dead_socket_writes_total=2, want 1
CPTEST shutdown MAYBE x
CPTEST-DONE 6.1.0-56-cloud-amd64
";
        let rows = parse_console("6.1.0-56", console, VmEnd::Exited, SCENARIOS);
        let summary: Vec<(&str, Verdict, &str)> = rows
            .iter()
            .map(|r| (r.scenario.as_str(), r.verdict, r.detail.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "check",
                    Verdict::Pass,
                    "24 ok, missing as expected: sock/sock_send_length (needs 6.4+)"
                ),
                ("idle-disconnect", Verdict::Pass, "idle_before_close=4.5s"),
                (
                    "dead-socket-write",
                    Verdict::Fail,
                    "dead_socket_writes_total=2, want 1"
                ),
                (
                    "shutdown",
                    Verdict::Fail,
                    "unreadable result line: CPTEST shutdown MAYBE x"
                ),
                ("memcache-decoding", Verdict::Fail, "no result"),
                ("preexisting-connection", Verdict::Fail, "no result"),
            ]
        );
    }

    #[test]
    fn unfinished_vm_fails_every_missing_scenario() {
        let console = "CPTEST-START 6.12\nCPTEST check PASS 26 ok, nothing missing\n";
        let rows = parse_console("6.12", console, VmEnd::TimedOut(VM_TIMEOUT), SCENARIOS);
        assert_eq!(rows.len(), SCENARIOS.len() + 1);
        assert_eq!(rows[0].verdict, Verdict::Pass);
        assert!(rows[1..].iter().all(|r| r.verdict == Verdict::Fail));
        assert_eq!(rows[1].detail, "no result");
        let last = rows.last().unwrap();
        assert_eq!(last.scenario, "vm");
        assert_eq!(last.detail, "did not finish: killed after 240 s");

        let rows = parse_console("6.12", "", VmEnd::Exited, SCENARIOS);
        assert_eq!(
            rows.last().unwrap().detail,
            "VM stopped before the scenarios finished"
        );

        let console = "CPTEST-START 6.12\n[   21.5] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n\
                       [   21.6] Kernel panic - not syncing: Fatal exception\n";
        let rows = parse_console("6.12", console, VmEnd::Exited, SCENARIOS);
        assert_eq!(
            rows.last().unwrap().detail,
            "VM stopped before the scenarios finished: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
        );
    }

    #[test]
    fn long_details_are_cut_on_a_character_boundary() {
        let console = format!("CPTEST check FAIL {}\nCPTEST-DONE\n", "é".repeat(700));
        let rows = parse_console("6.1", &console, VmEnd::Exited, SCENARIOS);
        assert_eq!(
            rows[0].detail,
            format!(
                "{}... (truncated; see the console log)",
                "é".repeat(MAX_DETAIL)
            )
        );
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            Row {
                kernel: "6.1.0-56-cloud-amd64".into(),
                scenario: "check".into(),
                verdict: Verdict::Pass,
                detail: "ok".into(),
            },
            Row {
                kernel: "host 6.18".into(),
                scenario: "-".into(),
                verdict: Verdict::Skip,
                detail: "no vmlinuz".into(),
            },
        ];
        assert_eq!(
            render_table(&rows),
            "kernel                scenario  result  detail\n\
             6.1.0-56-cloud-amd64  check     PASS    ok\n\
             host 6.18             -         SKIP    no vmlinuz\n"
        );
    }

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
        let degraded = check_json("missing", "dead-socket writes not seen");
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
        let failed_retransmit_probe = check_json("missing", "dead-socket writes not seen")
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
