//! The VM's initramfs: the agent with its shared libraries, memcached, busybox and the
//! scenarios, packed as a gzipped cpio.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use super::{kernels::expectations, Kernel, PreparedKernel};
use anyhow::{bail, Context as _};

// --- initramfs -----------------------------------------------------------------------------------

/// Shared libraries `ldd` lists for a binary, the dynamic loader included.
pub(super) fn parse_ldd(listing: &str) -> Vec<PathBuf> {
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

pub(super) fn build_initramfs(
    cache: &Path,
    kernel: Kernel,
    prepared: &PreparedKernel,
    agent: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let root = cache.join("initramfs").join(kernel.label());
    initramfs_base(&root, agent)?;
    write_file(&root, "/init", include_str!("../../vm/init.sh"), 0o755)?;
    write_file(
        &root,
        "/cptest/scenarios.sh",
        include_str!("../../vm/scenarios.sh"),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
