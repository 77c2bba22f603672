//! The kernels of the matrix: Debian's cloud kernels fetched with `apt-get download` and
//! cached (modules trimmed to what the agent needs), and what each kernel is expected to lack.

use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use super::{Kernel, Preparation, PreparedKernel, KEPT_MODULES, TRACEPOINT_SINCE};
use crate::util::{self, output, run_command, step};

// --- kernels -------------------------------------------------------------------------------------

pub(super) fn prepare_host() -> anyhow::Result<Preparation> {
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
pub(super) fn package_pattern(series: &str) -> String {
    format!(
        "^linux-image-{}\\.[0-9][^ ]*-cloud-amd64-unsigned$",
        series.replace('.', "\\.")
    )
}

/// The newest package of `series` in `apt-cache search` output ("name - description" lines).
pub(super) fn newest_package(series: &str, search_output: &str) -> Option<String> {
    let prefix = format!("linux-image-{series}.");
    search_output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix) && name.ends_with("-cloud-amd64-unsigned"))
        .max_by(|a, b| version_cmp(a, b))
        .map(str::to_string)
}

/// Orders names like `sort -V`: digit runs compare as numbers, everything else as text.
pub(super) fn version_cmp(a: &str, b: &str) -> Ordering {
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

pub(super) fn search_packages(series: &str) -> Option<String> {
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
pub(super) fn cached_package(kernels: &Path, series: &str) -> anyhow::Result<Option<String>> {
    let mut names = String::new();
    for entry in fs::read_dir(kernels)?.filter_map(Result::ok) {
        if entry.path().join("READY").is_file() && modules_complete(&entry.path()) {
            names.push_str(&entry.file_name().to_string_lossy());
            names.push('\n');
        }
    }
    Ok(newest_package(series, &names))
}

pub(super) fn load_cached(dir: &Path) -> anyhow::Result<Preparation> {
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
pub(super) fn download_kernel(package: &str, dir: &Path) -> anyhow::Result<()> {
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
pub(super) fn keep_modules(tree: &Path, into: &Path) -> anyhow::Result<()> {
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
pub(super) fn modules_complete(dir: &Path) -> bool {
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
pub(super) fn major_minor(release: &str) -> Option<String> {
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

pub(super) fn expectations_from_missing(missing: &str) -> String {
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
}
