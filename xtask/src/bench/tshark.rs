//! tshark decoding a dumpcap capture of the same traffic: the reference rate the decoder's
//! throughput is compared with.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{
    loadgen::{self, LoadSpec},
    procs::{self, Memcached},
    report::{thousands, Section, Table},
    Bench,
};
use crate::util;

impl Bench {
    pub(super) fn tshark_capture(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("tshark decoding a capture of the same traffic");
        let port = memcached.addr.port();
        let pcap = self.scratch.join("memcache.pcapng");
        let filter = format!("tcp port {port}");
        let load = self.capture(memcached, &pcap, &filter)?;
        let decode_as = format!("tcp.port=={port},memcache");
        let tshark_args = |limit: Option<&str>| tshark_args(&pcap, &decode_as, limit);
        let (startup, wall, commands) = time_tshark(&pcap, &tshark_args)?;
        let size = std::fs::metadata(&pcap).map_or(0, |m| m.len());
        let per_second = commands as f64 / wall;
        let per_second_net = commands as f64 / (wall - startup).max(1e-3);
        let mut section = Section::new("tshark decoding the same traffic");
        section.say(format!(
            "dumpcap captures loopback traffic to memcached while the xtask generator runs at {} \
             ops/s for {:.0} s over 16 connections (agent not running); the generator completed {} \
             requests, the capture holds {:.1} MB. tshark then decodes it once, single-threaded; \
             its startup (dissector registration, timed by decoding just the first packet) is \
             shown separately.",
            thousands(self.plan.capture_rate as f64),
            self.plan.capture_run.as_secs_f64(),
            thousands(load.ops as f64),
            size as f64 / 1048576.0
        ));
        section.command(format!(
            "dumpcap -i lo -q -f '{filter}' -w {}\ntime tshark {}",
            pcap.display(),
            tshark_args(None).join(" ")
        ));
        let mut table = Table::new(&[
            "commands decoded",
            "wall s",
            "startup s",
            "commands/s (wall)",
            "commands/s (without startup)",
        ]);
        table.row(vec![
            thousands(commands as f64),
            format!("{wall:.2}"),
            format!("{startup:.2}"),
            thousands(per_second),
            thousands(per_second_net),
        ]);
        section.table("", table);
        self.tshark_rate = Some(per_second_net);
        self.finish(section);
        Ok(())
    }

    /// dumpcap records loopback traffic matching `filter` to `pcap` while the generator runs
    /// (the agent is not running); returns the generator's report.
    fn capture(
        &self,
        memcached: &Memcached,
        pcap: &Path,
        filter: &str,
    ) -> anyhow::Result<loadgen::LoadReport> {
        let _ = std::fs::remove_file(pcap);
        let mut dumpcap_command = Command::new("dumpcap");
        dumpcap_command
            .args(["-i", "lo", "-q", "-f", filter, "-w"])
            .arg(pcap)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut dumpcap = procs::ChildGuard::spawn("dumpcap", &mut dumpcap_command)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // dumpcap writes the pcapng header once it is capturing.
        while std::fs::metadata(pcap).map_or(true, |m| m.len() == 0) {
            dumpcap.check_running()?;
            if Instant::now() >= deadline {
                bail!("dumpcap did not start capturing within 10 s");
            }
            procs::sleep(Duration::from_millis(50))?;
        }
        procs::sleep(Duration::from_millis(500))?;
        let spec = LoadSpec {
            connections: 16,
            ..self.spec(
                memcached.addr,
                Some(self.plan.capture_rate),
                self.plan.capture_run,
            )
        };
        let load = loadgen::run(&spec)?;
        procs::sleep(Duration::from_millis(500))?;
        dumpcap.stop()?;
        Ok(load)
    }
}

/// tshark's arguments to decode `pcap` as memcache, the first `limit` packets only if given.
fn tshark_args(pcap: &Path, decode_as: &str, limit: Option<&str>) -> Vec<String> {
    let mut args = vec!["-r".to_string(), pcap.display().to_string()];
    if let Some(limit) = limit {
        args.extend(["-c".to_string(), limit.to_string()]);
    }
    args.extend(
        [
            "-d",
            decode_as,
            "-Y",
            "memcache.command",
            "-T",
            "fields",
            "-e",
            "memcache.command",
            "-E",
            "occurrence=a",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

/// Times tshark's startup (decoding the first packet only) and a whole decode; returns (startup
/// s, wall s, memcache commands decoded).
fn time_tshark(
    pcap: &Path,
    tshark_args: &dyn Fn(Option<&str>) -> Vec<String>,
) -> anyhow::Result<(f64, f64, u64)> {
    let startup_started = Instant::now();
    procs::run_checked(
        "tshark",
        Command::new("tshark").args(tshark_args(Some("1"))),
        Duration::from_secs(120),
    )?;
    let startup = startup_started.elapsed().as_secs_f64();
    let decode_started = Instant::now();
    let output = procs::run_checked(
        "tshark",
        Command::new("tshark").args(tshark_args(None)),
        Duration::from_secs(600),
    )?;
    let wall = decode_started.elapsed().as_secs_f64();
    let commands: u64 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.split(',').filter(|c| !c.trim().is_empty()).count() as u64)
        .sum();
    if commands == 0 {
        bail!("tshark decoded no memcache command from {}", pcap.display());
    }
    Ok((startup, wall, commands))
}
