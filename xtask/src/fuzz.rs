//! The bounded libFuzzer run of the memcache decoder, built the way `cargo fuzz run` builds it
//! (the same rustc flags as cargo-fuzz 0.13) without installing cargo-fuzz: building cargo-fuzz
//! from source took 688 s of a fresh machine's 2,538 s CI run, for a 60 s fuzz.

use std::process::Command;

use crate::util;

/// The target triple the fuzz target is built for: cargo-fuzz passes it explicitly, so the
/// rustflags do not reach build scripts (which must not be instrumented).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// cargo-fuzz 0.13's flags for `cargo fuzz run` on Linux with its defaults: sancov
/// instrumentation for libFuzzer, `cfg(fuzzing)`, AddressSanitizer, debug assertions (it
/// passes them unless `-O`), one codegen unit in release (ThinLTO imports nothing otherwise).
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "-Zsanitizer=address",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cdebug-assertions",
    "-Ccodegen-units=1",
];

/// Fuzzes the decoder for `seconds` from its corpus (new inputs are added to it, crashes saved
/// under `fuzz/artifacts/decoder/`); fails on a crash.
pub fn run_decoder(seconds: u32) -> anyhow::Result<()> {
    let fuzz = util::workspace_root().join("fuzz");
    let corpus = fuzz.join("corpus/decoder");
    let artifacts = fuzz.join("artifacts/decoder");
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let mut artifact_prefix = std::ffi::OsString::from("-artifact_prefix=");
    artifact_prefix.push(&artifacts);
    // A trailing slash: libFuzzer prepends the prefix to file names as it is.
    artifact_prefix.push("/");
    util::run_command(
        Command::new("cargo")
            .args(["+nightly", "run", "--manifest-path"])
            .arg(fuzz.join("Cargo.toml"))
            .args([
                "--target",
                TRIPLE,
                "--release",
                "--config",
                "profile.release.debug=\"line-tables-only\"",
                "--bin",
                "decoder",
                "--",
            ])
            .arg(artifact_prefix)
            .arg(format!("-max_total_time={seconds}"))
            .arg(&corpus)
            .env("RUSTFLAGS", RUSTFLAGS.join(" "))
            .env("ASAN_OPTIONS", "detect_odr_violation=0")
            .env("PATH", util::path_with_cargo_bin()),
    )
}
