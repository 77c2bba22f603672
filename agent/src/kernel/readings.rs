//! Reads the kernel's running totals once a tick for the pipeline, which stays free of I/O:
//! ring and map losses, and per-program run time while `kernel.bpf_stats_enabled` is on.

use std::time::Duration;

use crate::kernel::loader::Probes;

/// The kernel's totals since the probes were loaded, as read at one tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelReadings {
    /// Loss totals by `events_lost_total` source; None when the counters could not be read.
    pub losses: Option<Vec<(&'static str, u64)>>,
    /// Run time and run count per program; None while the kernel does not count them.
    pub program_stats: Option<Vec<(String, Duration, u64)>>,
}

impl KernelReadings {
    pub fn read(probes: &Probes) -> KernelReadings {
        let losses = match probes.kernel_losses() {
            Ok(totals) => Some(totals.to_vec()),
            Err(err) => {
                tracing::debug!(%err, "cannot read kernel loss counters");
                None
            }
        };
        KernelReadings {
            losses,
            program_stats: bpf_stats_enabled().then(|| probes.program_stats()),
        }
    }
}

fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}
