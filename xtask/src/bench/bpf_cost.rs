//! BPF program cost per program: saturation runs with `kernel.bpf_stats_enabled=1`, sockets
//! only and capture on, split by program, cross-checked against the agent's own export, and the
//! kernel memory its maps hold.

use std::time::Duration;

use anyhow::bail;

use super::{
    harness::{format_cpu, Measured},
    observe,
    procs::{self, Memcached, Mode, SysctlGuard},
    report::{thousands, Section, Table},
    targets::BpfSplit,
    Bench, DEFAULT_MAX_SOCKETS,
};
use crate::util;

/// The agent's export of its programs' kernel run time (from bpf_stats).
const EXPORTED_RUN_SECONDS: &str = "cacheprobe_bpf_program_run_seconds_total";

/// One bpf_stats run: per program (name, run ns, runs), busiest first.
struct BpfRun {
    spec: String,
    programs: Vec<(String, u64, u64)>,
    measured: Measured,
    /// Growth of the agent's own export of the programs' run time over the run.
    exported_run_seconds: f64,
    maps: Vec<observe::MapInfo>,
}

impl BpfRun {
    fn ops(&self) -> f64 {
        self.measured.load.ops as f64
    }

    fn total_ns(&self) -> u64 {
        self.programs.iter().map(|program| program.1).sum()
    }

    fn ns_per_op(&self) -> f64 {
        self.total_ns() as f64 / self.ops().max(1.0)
    }

    fn table(&self) -> Table {
        let ops = self.ops().max(1.0);
        let total_ns = self.total_ns().max(1) as f64;
        let mut table = Table::new(&[
            "program",
            "runs",
            "runs per op",
            "ns/run",
            "total ms",
            "share",
        ]);
        for (name, ns, cnt) in &self.programs {
            table.row(vec![
                name.clone(),
                thousands(*cnt as f64),
                format!("{:.2}", *cnt as f64 / ops),
                if *cnt > 0 {
                    format!("{:.0}", *ns as f64 / *cnt as f64)
                } else {
                    "-".into()
                },
                format!("{:.1}", *ns as f64 / 1e6),
                format!("{:.1}%", 100.0 * *ns as f64 / total_ns),
            ]);
        }
        table
    }
}

impl Bench {
    /// One saturation run of the agent in `mode` with bpf_stats on.
    fn bpf_stats_run(&mut self, memcached: &Memcached, mode: Mode) -> anyhow::Result<BpfRun> {
        let mut agent = self.start_agent(memcached.addr.port(), mode, DEFAULT_MAX_SOCKETS)?;
        let (programs, maps) = procs::bpf_object_ids(agent.pid())?;
        if programs.is_empty() {
            bail!("the agent holds no BPF program fds");
        }
        let spec = self.spec(memcached.addr, None, self.plan.run);
        let exported_run_seconds;
        let (measured, before, after) = {
            // Stats cost two clock reads per program run, so they are on for this run only
            // (never during the A/B runs), and put back when this block ends, error or not.
            self.wait_for_quiet(Some(&agent))?;
            let _stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
            let before = observe::program_stats(&programs)?;
            let exported_before = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let measured = self.measure(&spec, Some(&mut agent), memcached)?;
            let after = observe::program_stats(&programs)?;
            // The agent folds program stats into its metrics once a second.
            procs::sleep(Duration::from_millis(1500))?;
            let exported_after = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            exported_run_seconds = observe::total(&exported_after, EXPORTED_RUN_SECONDS)
                - observe::total(&exported_before, EXPORTED_RUN_SECONDS);
            (measured, before, after)
        };
        let maps = observe::maps(&maps)?;
        agent.stop()?;
        let mut programs: Vec<(String, u64, u64)> = after
            .iter()
            .map(|(id, stats)| {
                let (ns0, cnt0) = before
                    .get(id)
                    .map_or((0, 0), |b| (b.run_time_ns, b.run_cnt));
                (
                    stats.name.clone(),
                    stats.run_time_ns.saturating_sub(ns0),
                    stats.run_cnt.saturating_sub(cnt0),
                )
            })
            .collect();
        programs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(BpfRun {
            spec: spec.describe(),
            programs,
            measured,
            exported_run_seconds,
            maps,
        })
    }

    pub(super) fn bpf_program_cost(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("BPF program cost (kernel.bpf_stats_enabled=1, sockets only, saturation)");
        let sockets = self.bpf_stats_run(memcached, Mode::SocketsOnly)?;
        self.targets.sockets_bpf_ns_per_op = Some(sockets.ns_per_op());
        util::step("BPF program cost (kernel.bpf_stats_enabled=1, capture on, saturation)");
        let capture = self.bpf_stats_run(memcached, Mode::Capture)?;
        if let Some((name, ns, cnt)) = capture.programs.first() {
            let total_ns = capture.total_ns();
            self.targets.bpf = Some(BpfSplit {
                ns_per_op: capture.ns_per_op(),
                top: (
                    name.clone(),
                    *ns as f64 / total_ns.max(1) as f64,
                    *ns as f64 / (*cnt).max(1) as f64,
                ),
            });
        }
        let (ops, total_ns, measured, exported_run_seconds) = (
            capture.ops(),
            capture.total_ns(),
            &capture.measured,
            capture.exported_run_seconds,
        );
        let spec = &capture.spec;
        let mut section = Section::new("BPF program cost per program");
        section.say(format!(
            "Two extra saturation runs ({spec}), one with socket probes only and one with capture \
             on, with `sysctl kernel.bpf_stats_enabled=1` (restored afterwards); run_time_ns and \
             run_cnt from `bpftool --json prog show` before and after, for the programs whose fds \
             the agent holds (/proc/<pid>/fdinfo); the stats themselves add a little time per \
             run. Sockets only: {} ops/s, **{:.0} ns of BPF per memcache op**. Capture on: {} \
             ops/s ({} ops), **{:.0} ns of BPF per memcache op**, i.e. {:.3} CPU s per million \
             ops in the kernel, on top of the agent process's own {} s per million ops.",
            thousands(sockets.measured.load.ops_per_sec()),
            sockets.ns_per_op(),
            thousands(measured.load.ops_per_sec()),
            thousands(ops),
            total_ns as f64 / ops.max(1.0),
            total_ns as f64 / 1e9 / (ops / 1e6).max(1e-9),
            format_cpu(measured.cpu_per_million()),
        ));
        section.say(format!(
            "Cross-check: the agent's own `{EXPORTED_RUN_SECONDS}` grew by {:.3} s over the \
             capture run (plus the 1.5 s after it); bpftool says {:.3} s.",
            exported_run_seconds,
            total_ns as f64 / 1e9
        ));
        section.command("sysctl -w kernel.bpf_stats_enabled=1\nbpftool --json prog show   # before and after the run\nsysctl -w kernel.bpf_stats_enabled=<previous>");
        section.table("Sockets only:", sockets.table());
        section.table("Capture on:", capture.table());
        let mut map_table = Table::new(&["map", "type", "max_entries", "kernel memory MB"]);
        let mut map_total = 0;
        for map in &capture.maps {
            map_total += map.bytes_memlock;
            map_table.row(vec![
                map.name.clone(),
                map.kind.clone(),
                map.max_entries.to_string(),
                format!("{:.1}", map.bytes_memlock as f64 / 1048576.0),
            ]);
        }
        map_table.row(vec![
            "total".into(),
            String::new(),
            String::new(),
            format!("{:.1}", map_total as f64 / 1048576.0),
        ]);
        section.table(
            "Kernel memory held by the agent's maps (`bytes_memlock` from `bpftool --json map show`; not part of the agent's RSS), default limits:",
            map_table,
        );
        self.finish(section);
        Ok(())
    }
}
