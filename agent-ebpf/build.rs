use which::which;

/// Rebuild the kernel object when bpf-linker changes (it is built against nightly's LLVM, and a
/// new nightly means a new linker). Also: let LLVM expand memset and memmove inline.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
    // bpf-linker asks LLVM for `--bpf-expand-memcpy-in-order` by default, a mode kept for
    // offload JITs that pattern-match copies. It lowers memcpy well but turns every memset and
    // memmove into a call of a byte-at-a-time loop: a followed call's frame-state copies and a
    // ring event's zeroing cost 5-8 instructions per byte. Without it LLVM expands them into
    // word loads and stores.
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
