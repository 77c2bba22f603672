//! What /proc says about a process under test: resident memory and CPU time.

/// The fields of /proc/<pid>/stat after the command name (which may hold spaces and
/// parentheses): index 0 is the state, 11 and 12 are utime and stime. None once it is gone.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User plus system CPU seconds the process has used (0 once it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks: f64 = stat_fields(pid).map_or(0.0, |fields| {
        fields
            .iter()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse::<f64>().ok())
            .sum()
    });
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Resident memory in KiB (VmRSS), None once the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
