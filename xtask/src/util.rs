//! Shared helpers for xtask: the workspace root, timed CI steps, running commands and cargo, and root checks.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Steps started so far, with their start times: CI must stay under 40 minutes, so every run
/// says where its time went.
static STEPS: Mutex<Vec<(String, Instant)>> = Mutex::new(Vec::new());

pub fn step(what: &str) {
    let now = Instant::now();
    let mut steps = STEPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((previous, started)) = steps.last() {
        eprintln!(
            "xtask: <== {previous}: {:.0} s",
            now.duration_since(*started).as_secs_f64()
        );
    }
    steps.push((what.to_string(), now));
    eprintln!("\nxtask: ==> {what}");
}

/// Prints how long each step took (the last one ends now), with the total since the first.
pub fn print_step_times() {
    let now = Instant::now();
    let steps = STEPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some((_, first)) = steps.first() else {
        return;
    };
    eprintln!("\nxtask: time per step");
    for (index, (name, started)) in steps.iter().enumerate() {
        let ended = steps.get(index + 1).map_or(now, |(_, next)| *next);
        eprintln!(
            "  {:>6.0} s  {name}",
            ended.duration_since(*started).as_secs_f64()
        );
    }
    let total: Duration = now.duration_since(*first);
    eprintln!("  {:>6.0} s  total", total.as_secs_f64());
}

pub fn run_command(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None when it fails or does not exist.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_with_env(args, &[])
}

pub fn cargo_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command.current_dir(workspace_root()).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.env("PATH", path_with_cargo_bin());
    run_command(&mut command)
}

/// PATH with ~/.cargo/bin first, so a freshly installed bpf-linker is found by aya-build.
pub fn path_with_cargo_bin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    match std::env::var("HOME") {
        Ok(home) => format!("{home}/.cargo/bin:{path}"),
        Err(_) => path,
    }
}

pub fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|uid| uid.trim() == "0")
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("must run as root: {why}");
    }
    Ok(())
}
