use std::path::PathBuf;

use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

/// Builds the kernel programs (agent-ebpf) for bpfel-unknown-none with nightly and bpf-linker,
/// and leaves the object in OUT_DIR for `include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("agent-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../agent-common/src").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
