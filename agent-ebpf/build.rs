use which::which;

/// Rebuild the kernel object when bpf-linker changes (it is built against nightly's LLVM, and a
/// new nightly means a new linker).
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
