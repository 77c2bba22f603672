//! What processes and the machine use: CPU (per process, per thread, machine-wide), memory,
//! whether the machine is quiet enough to measure, and the BPF objects a process holds.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::sleep;

/// CPU seconds (user + system, all threads) a process has used.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .with_context(|| format!("cannot parse /proc/{pid}/stat"))
}

/// CPU ns of all of a process's threads so far (scheduler run time, user and kernel, with ns
/// precision: /proc/PID/task/*/schedstat). Threads that exited meanwhile are not counted, so
/// compare only across windows in which the process keeps its threads.
pub fn task_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("process {pid} is gone"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between listing and reading.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += parse_schedstat_ns(&text)
                .with_context(|| format!("cannot parse {}", path.display()))?;
        }
    }
    Ok(total)
}

fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// CPU ns of the calling thread so far (user and kernel, including BPF programs its syscalls
/// ran).
pub fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// User-mode CPU seconds of a process (all threads).
pub fn user_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    parse_user_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_second())
        .with_context(|| format!("cannot parse /proc/{pid}/stat"))
}

/// User-mode CPU seconds of the whole machine (user + nice of /proc/stat).
pub fn machine_user_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let mut fields = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>().unwrap_or(0));
    let user = fields.next().unwrap_or(0);
    let nice = fields.next().unwrap_or(0);
    Ok((user + nice) as f64 / clock_ticks_per_second())
}

/// Busy CPU seconds of the whole machine (everything but idle and iowait in /proc/stat).
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle (3) and iowait (4).
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(busy as f64 / clock_ticks_per_second())
}

/// Waits until the machine is nearly idle (under `threshold` cores busy over a second) and no
/// tracing BPF program but `own` is loaded, for at most `limit`; returns how long it waited
/// and whether it got quiet. Shared build machines (and other agents under test) are the main
/// source of noise in A/B runs.
pub fn wait_for_quiet(threshold: f64, own: &[u32], limit: Duration) -> anyhow::Result<Quiet> {
    let started = Instant::now();
    loop {
        let before = machine_busy_seconds()?;
        sleep(Duration::from_secs(1))?;
        let busy = machine_busy_seconds()? - before;
        let foreign = super::super::observe::foreign_tracing_programs(own)?;
        if (busy < threshold && foreign == 0) || started.elapsed() >= limit {
            return Ok(Quiet {
                waited: started.elapsed(),
                busy_cores: busy,
                foreign_programs: foreign,
                quiet: busy < threshold && foreign == 0,
            });
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Quiet {
    pub waited: Duration,
    pub busy_cores: f64,
    pub foreign_programs: usize,
    pub quiet: bool,
}

impl Quiet {
    pub fn describe(&self) -> String {
        let mut text = format!("{:.0}", self.waited.as_secs_f64());
        if !self.quiet {
            text.push_str(&format!(
                " (not quiet: {:.2} cores busy, {} foreign tracing programs)",
                self.busy_cores, self.foreign_programs
            ));
        }
        text
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime from /proc/<pid>/stat; the command name may contain spaces and parentheses,
/// so fields are counted from the last ')'.
fn parse_user_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(11)?.parse().ok()
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3 of the man page, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Heap and other private memory: what the agent itself allocates.
    pub anon_kb: u64,
    /// File-backed and shared mappings; for the agent mostly the BPF ring buffers it maps
    /// (kernel memory, data area mapped twice), not allocations of its own.
    pub file_kb: u64,
}

impl Memory {
    /// "60.2 (anon 14.1, mapped 46.0)": total resident MB, the private part and the mappings.
    pub fn describe(&self) -> String {
        format!(
            "{:.1} (anon {:.1}, mapped {:.1})",
            self.rss_kb as f64 / 1024.0,
            self.anon_kb as f64 / 1024.0,
            self.file_kb as f64 / 1024.0
        )
    }
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    parse_memory(&status).with_context(|| format!("no VmRSS/VmHWM in /proc/{pid}/status"))
}

fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
        anon_kb: field("RssAnon:").unwrap_or(0),
        file_kb: field("RssFile:").unwrap_or(0) + field("RssShmem:").unwrap_or(0),
    })
}

/// The ids of the BPF programs and maps a process holds, from the fdinfo of its descriptors.
pub fn bpf_object_ids(pid: u32) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let mut programs = Vec::new();
    let mut maps = Vec::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        for line in text.lines() {
            let id = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|v| v.trim().parse().ok())
            };
            if let Some(id) = id("prog_id:") {
                programs.push(id);
            } else if let Some(id) = id("map_id:") {
                maps.push(id);
            }
        }
    }
    programs.sort_unstable();
    programs.dedup();
    maps.sort_unstable();
    maps.dedup();
    Ok((programs, maps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_run_time_is_its_first_field() {
        assert_eq!(parse_schedstat_ns("123456789 2000 17\n"), Some(123_456_789));
        assert_eq!(parse_schedstat_ns(""), None);
        assert_eq!(parse_schedstat_ns("x 1 2"), None);
    }

    #[test]
    fn cpu_ticks_survive_odd_process_names() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 99 1000 200 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_user_ticks(stat), Some(250));
        assert_eq!(parse_cpu_ticks("1234 (x) S 1"), None);
    }

    #[test]
    fn memory_fields() {
        let status = "Name:\tcacheprobe\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nRssAnon:\t 2048 kB\nRssFile:\t 8000 kB\nRssShmem:\t 192 kB\n";
        let memory = parse_memory(status).unwrap();
        assert_eq!((memory.rss_kb, memory.hwm_kb), (10240, 20480));
        assert_eq!((memory.anon_kb, memory.file_kb), (2048, 8192));
        assert_eq!(memory.describe(), "10.0 (anon 2.0, mapped 8.0)");
        assert!(parse_memory("Name: x\n").is_none());
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(memory(pid).unwrap().rss_kb > 0);
        assert!(user_seconds(pid).unwrap() <= cpu_seconds(pid).unwrap());
        assert!(machine_user_seconds().unwrap() > 0.0);
        assert!(machine_busy_seconds().unwrap() >= machine_user_seconds().unwrap());
    }
}
