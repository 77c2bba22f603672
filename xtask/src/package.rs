//! `cargo xtask package`: a .deb with the binary, the systemd unit, the default config as a
//! conffile, the man page and shell completions; then installed and removed in a throwaway dpkg
//! root to prove it installs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{util, vm};

const PACKAGE: &str = "cacheprobe";

pub fn version() -> anyhow::Result<String> {
    let manifest = fs::read_to_string(util::workspace_root().join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|line| {
            line.strip_prefix("version = \"")
                .and_then(|rest| rest.strip_suffix('"'))
        })
        .map(str::to_string)
        .context("no workspace version in Cargo.toml")
}

fn install_file(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to).with_context(|| format!("copy {} -> {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn gzip(path: &Path) -> anyhow::Result<()> {
    util::run_command(Command::new("gzip").args(["-9n", "-f"]).arg(path))
}

/// Builds the .deb and returns its path.
pub fn package() -> anyhow::Result<PathBuf> {
    package_as(None)
}

/// The workspace version, or the version an upgrade test needs (the contents are the same).
pub fn package_as(version_override: Option<&str>) -> anyhow::Result<PathBuf> {
    let root = util::workspace_root();
    let binary = vm::target_dir().join("release/cacheprobe");
    let version = match version_override {
        Some(version) => version.to_string(),
        None => version()?,
    };
    let arch = util::output("dpkg", &["--print-architecture"])
        .context("dpkg not found")?
        .trim()
        .to_string();
    let stage = vm::target_dir().join("package/stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("DEBIAN"))?;

    install_file(&binary, &stage.join("usr/bin/cacheprobe"), 0o755)?;
    install_file(
        &root.join("packaging/systemd/cacheprobe.service"),
        &stage.join("lib/systemd/system/cacheprobe.service"),
        0o644,
    )?;
    install_file(
        &root.join("packaging/config.toml"),
        &stage.join("etc/cacheprobe/config.toml"),
        0o644,
    )?;
    install_file(
        &root.join("packaging/prometheus/cacheprobe.rules.yml"),
        &stage.join("usr/share/cacheprobe/prometheus/cacheprobe.rules.yml"),
        0o644,
    )?;
    install_file(
        &root.join("packaging/grafana/cacheprobe.json"),
        &stage.join("usr/share/cacheprobe/grafana/cacheprobe.json"),
        0o644,
    )?;

    let assets = vm::target_dir().join("package/assets");
    let _ = fs::remove_dir_all(&assets);
    util::run_command(
        Command::new(&binary)
            .args(["generate-assets", "--out"])
            .arg(&assets),
    )?;
    let man = stage.join("usr/share/man/man1/cacheprobe.1");
    install_file(&assets.join("cacheprobe.1"), &man, 0o644)?;
    gzip(&man)?;
    install_file(
        &assets.join("cacheprobe.bash"),
        &stage.join("usr/share/bash-completion/completions/cacheprobe"),
        0o644,
    )?;
    install_file(
        &assets.join("_cacheprobe"),
        &stage.join("usr/share/zsh/vendor-completions/_cacheprobe"),
        0o644,
    )?;
    install_file(
        &assets.join("cacheprobe.fish"),
        &stage.join("usr/share/fish/vendor_completions.d/cacheprobe.fish"),
        0o644,
    )?;
    let docs = stage.join("usr/share/doc/cacheprobe");
    install_file(&root.join("README.md"), &docs.join("README.md"), 0o644)?;
    gzip(&docs.join("README.md"))?;

    for script in ["postinst", "prerm", "postrm"] {
        install_file(
            &root.join("packaging/debian").join(script),
            &stage.join("DEBIAN").join(script),
            0o755,
        )?;
    }
    fs::write(
        stage.join("DEBIAN/conffiles"),
        "/etc/cacheprobe/config.toml\n",
    )?;
    let installed_kb = du_kb(&stage)?;
    fs::write(
        stage.join("DEBIAN/control"),
        format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: cacheprobe developers <cacheprobe@example.invalid>\n\
             Installed-Size: {installed_kb}\n\
             Depends: libc6 (>= 2.34)\n\
             Recommends: systemd\n\
             Section: net\n\
             Priority: optional\n\
             Description: eBPF agent for memcache clients and servers\n \
             Watches memcached, twemproxy and memcache-protocol queue sockets from the kernel\n \
             with eBPF tracepoints, decodes the memcache protocol and exports Prometheus\n \
             metrics about idle disconnects, dead-socket writes, retransmits, listen-queue\n \
             overflows and fd exhaustion.\n"
        ),
    )?;
    let deb = vm::target_dir().join(format!("package/{PACKAGE}_{version}_{arch}.deb"));
    util::run_command(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    eprintln!("xtask: built {}", deb.display());
    Ok(deb)
}

fn du_kb(dir: &Path) -> anyhow::Result<u64> {
    let out = util::output("du", &["-sk", dir.to_str().unwrap_or_default()]).context("du")?;
    Ok(out.split_whitespace().next().unwrap_or("0").parse()?)
}

/// Installs the package into an empty dpkg root, checks its files and that the binary runs,
/// then removes it (the conffile stays, as dpkg keeps conffiles until purge).
pub fn install_test(deb: &Path) -> anyhow::Result<()> {
    let root = vm::target_dir().join("package/dpkg-root");
    let _ = fs::remove_dir_all(&root);
    for dir in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::write(root.join("var/lib/dpkg/status"), "")?;
    let dpkg = |args: &[&str]| -> anyhow::Result<()> {
        util::run_command(
            Command::new("dpkg")
                .arg(format!("--root={}", root.display()))
                .args([
                    "--force-depends",
                    "--force-script-chrootless",
                    "--log=/dev/null",
                ])
                .args(args),
        )
    };
    dpkg(&["-i", deb.to_str().unwrap_or_default()])?;
    for file in [
        "usr/bin/cacheprobe",
        "lib/systemd/system/cacheprobe.service",
        "etc/cacheprobe/config.toml",
        "usr/share/man/man1/cacheprobe.1.gz",
        "usr/share/bash-completion/completions/cacheprobe",
    ] {
        if !root.join(file).exists() {
            bail!("{file} missing after install");
        }
    }
    let listed = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-L", PACKAGE])
        .output()?;
    if !String::from_utf8_lossy(&listed.stdout).contains("/usr/bin/cacheprobe") {
        bail!("dpkg -L does not list the binary");
    }
    let version = Command::new(root.join("usr/bin/cacheprobe"))
        .arg("--version")
        .output()?;
    if !version.status.success() {
        bail!("installed binary does not run");
    }
    // The shipped config must be valid for the shipped binary (check parses it, then loads
    // and attaches the probes).
    let check = Command::new(root.join("usr/bin/cacheprobe"))
        .args(["check", "--json", "--config"])
        .arg(root.join("etc/cacheprobe/config.toml"))
        .output()?;
    if !check.status.success() {
        bail!(
            "installed binary rejects its shipped config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    dpkg(&["-r", PACKAGE])?;
    if root.join("usr/bin/cacheprobe").exists() {
        bail!("binary still present after removal");
    }
    if !root.join("etc/cacheprobe/config.toml").exists() {
        bail!("conffile removed by a plain remove");
    }
    eprintln!(
        "xtask: {} installs into and removes from a fresh dpkg root",
        deb.display()
    );
    Ok(())
}
