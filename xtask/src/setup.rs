//! Idempotent installation of everything the project needs. Each step checks first and only
//! installs what is missing, so re-running is cheap.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

use crate::util::{self, output, run_command, step};

/// Debian packages the tests and tools use: real servers, real clients and the checkers.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "memcached",
    "nutcracker",
    "libmemcached-tools",
    "python3-pymemcache",
    "python3-memcache",
    // A venv for the PyPI clients below (it brings pip via ensurepip).
    "python3-venv",
    "ruby",
    "ruby-dalli",
    "tshark",
    "prometheus",
    "iproute2",
    "iptables",
    "bpftool",
    "util-linux",
    "libcap2-bin",
    "curl",
    "openssl",
    "systemd",
    // `dot -Tsvg` checks diagnose's --graph dot output.
    "graphviz",
    // `vm-test --systemd` builds its Debian root filesystem with it.
    "mmdebstrap",
];

pub fn setup() -> anyhow::Result<()> {
    setup_build_tools()?;
    if util::is_root() {
        install_debian_packages(DEBIAN_PACKAGES)?;
        ensure_node()?;
        ensure_pypi_clients()?;
        ensure_npm_clients()?;
        mount_tracefs()?;
    } else {
        eprintln!("xtask: not root: skipping Debian packages and tracefs (needed only to run the agent and the integration tests)");
    }
    Ok(())
}

/// What building the kernel object needs: nightly with rust-src and a bpf-linker built against
/// nightly's own LLVM.
pub fn setup_build_tools() -> anyhow::Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup not found")?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        step("installing the nightly toolchain");
        run_command(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        return Ok(());
    }
    let components =
        output("rustup", &["+nightly", "component", "list", "--installed"]).unwrap_or_default();
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        step("adding rust-src to nightly");
        run_command(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn home() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(
        std::env::var("HOME").context("HOME is not set")?,
    ))
}

/// bpf-linker bakes in the LLVM it was built against; we build it against nightly's libLLVM
/// and remember which nightly that was, rebuilding when nightly changes.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])
        .context("rustc +nightly not runnable")?;
    let sysroot = PathBuf::from(sysroot.trim());
    let nightly_version = output("rustc", &["+nightly", "-vV"]).unwrap_or_default();
    let prefix = home()?.join(".cache/cacheprobe/llvm");
    let stamp = prefix.join("bpf-linker.stamp");
    let linker = home()?.join(".cargo/bin/bpf-linker");
    let up_to_date = linker.exists()
        && fs::read_to_string(&stamp).is_ok_and(|built_for| built_for == nightly_version)
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if up_to_date {
        return Ok(());
    }
    step("building bpf-linker against nightly's LLVM");
    let lib_dir = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| {
            name.starts_with("libLLVM.so.")
                || (name.starts_with("libLLVM-") && name.ends_with(".so"))
        })
        .with_context(|| format!("no libLLVM in {}", lib_dir.display()))?;
    let major = nightly_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .context("cannot read nightly's LLVM version")?
        .to_string();
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), libllvm.clone()] {
        let link = prefix_lib.join(&name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    let feature = format!("llvm-{major}");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &feature,
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    fs::write(&stamp, nightly_version)?;
    Ok(())
}

fn package_installed(package: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|status| status.contains("install ok installed"))
}

pub fn install_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run_command(Command::new("apt-get").args(["update", "-qq"]))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn mount_tracefs() -> anyhow::Result<()> {
    if std::path::Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(());
    }
    step("mounting tracefs at /sys/kernel/tracing");
    run_command(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

/// Memcache clients from PyPI (name, pinned version), in a venv of Debian's python3 under
/// ~/.cache/cacheprobe/python (the exactness tests run them from there).
pub const PYPI_CLIENTS: &[(&str, &str)] = &[("python-binary-memcached", "0.33.0")];

/// Memcache clients from the npm registry (name, pinned version), under
/// ~/.cache/cacheprobe/node/node_modules: memjs speaks binary, memcached text.
pub const NPM_CLIENTS: &[(&str, &str)] = &[("memjs", "1.3.2"), ("memcached", "2.2.2")];

fn client_cache() -> anyhow::Result<PathBuf> {
    Ok(home()?.join(".cache/cacheprobe"))
}

/// node and npm: some hosts have them from another apt source (whose nodejs bundles npm and
/// conflicts with Debian's npm), so Debian's are installed only when either command is missing.
fn ensure_node() -> anyhow::Result<()> {
    if output("node", &["--version"]).is_some() && output("npm", &["--version"]).is_some() {
        return Ok(());
    }
    install_debian_packages(&["nodejs", "npm"])
}

fn ensure_pypi_clients() -> anyhow::Result<()> {
    let venv = client_cache()?.join("python");
    let python = venv.join("bin/python");
    let python = python.to_str().context("non-UTF-8 cache path")?;
    let missing: Vec<String> = PYPI_CLIENTS
        .iter()
        .filter(|(name, version)| {
            let probe = format!("import importlib.metadata as m; print(m.version('{name}'))");
            output(python, &["-c", &probe]).is_none_or(|found| found.trim() != *version)
        })
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing PyPI clients: {}", missing.join(" ")));
    if !std::path::Path::new(python).exists() {
        run_command(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
        )?;
    }
    run_command(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )
}

fn ensure_npm_clients() -> anyhow::Result<()> {
    let dir = client_cache()?.join("node");
    let missing: Vec<String> = NPM_CLIENTS
        .iter()
        .filter(|(name, version)| {
            let manifest = dir.join("node_modules").join(name).join("package.json");
            fs::read_to_string(manifest)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .is_none_or(|json| json["version"] != *version)
        })
        .map(|(name, version)| format!("{name}@{version}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing npm clients: {}", missing.join(" ")));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    run_command(
        Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--save-exact",
                "--prefix",
            ])
            .arg(&dir)
            .args(&missing),
    )
}
