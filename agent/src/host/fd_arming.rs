//! When to attach the EMFILE/ENFILE probes. They are syscall tracepoints (the raw `sys_exit`
//! one where kernel BTF allows, which also runs its program on every syscall exit; else the six
//! `sys_exit_*`), and while any syscall tracepoint is attached the kernel sends every syscall of
//! every process on the host through its slow tracing path: a tax of a few percent on
//! syscall-heavy servers, paid all the time for an error that can only happen near a
//! descriptor limit. So they are attached ("armed") only
//! while the sampler sees a process holding watched sockets, or the host, using a good share of
//! its limit, and detached again once usage has stayed low for a while.

use crate::host::Snapshot;

/// Usage (open / limit) at which the probes are attached. Half the limit leaves headroom for
/// usage that grows between two samples.
pub const ARM_AT_USAGE: f64 = 0.5;
/// Usage below which the probes may be detached again (lower than [`ARM_AT_USAGE`], so usage
/// hovering around the threshold does not attach and detach them every sample).
pub const DISARM_BELOW_USAGE: f64 = 0.4;
/// Consecutive low samples before detaching: a minute at the default 5 s interval.
pub const CALM_SAMPLES_TO_DISARM: u32 = 12;

/// The highest descriptor usage in a sample: of every process holding watched sockets (against
/// its soft RLIMIT_NOFILE) and of the host (open file handles against fs.file-max), each by
/// [`crate::model::fd_usage_ratio`], the rule the exported ratio uses too.
pub fn peak_fd_usage(snapshot: &Snapshot) -> f64 {
    let processes = snapshot
        .processes
        .iter()
        .map(|process| process.fd_usage_ratio());
    let host = snapshot
        .file_handles
        .iter()
        .map(|files| crate::model::fd_usage_ratio(files.open, files.max));
    processes.chain(host).fold(0.0, f64::max)
}

#[derive(Debug, Clone, PartialEq)]
pub struct FdProbeArming {
    armed: bool,
    calm_samples: u32,
}

impl FdProbeArming {
    /// The probes start attached (a start-up in the middle of an fd incident misses nothing);
    /// the first sample decides at once, without waiting for calm samples.
    pub fn new() -> Self {
        FdProbeArming {
            armed: true,
            calm_samples: CALM_SAMPLES_TO_DISARM,
        }
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Takes one sample's [`peak_fd_usage`]; returns the new state when it changes.
    pub fn observe(&mut self, peak_usage: f64) -> Option<bool> {
        if peak_usage >= ARM_AT_USAGE {
            self.calm_samples = 0;
            if !self.armed {
                self.armed = true;
                return Some(true);
            }
            return None;
        }
        if peak_usage < DISARM_BELOW_USAGE {
            self.calm_samples = self.calm_samples.saturating_add(1);
        } else {
            self.calm_samples = 0;
        }
        if self.armed && self.calm_samples >= CALM_SAMPLES_TO_DISARM {
            self.armed = false;
            return Some(false);
        }
        None
    }
}

impl Default for FdProbeArming {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{aggregate::ProcessUsage, parse::FileHandles};

    #[test]
    fn a_calm_first_sample_detaches_at_once() {
        let mut arming = FdProbeArming::new();
        assert!(arming.is_armed());
        assert_eq!(arming.observe(0.01), Some(false));
        assert!(!arming.is_armed());
        assert_eq!(arming.observe(0.01), None);
    }

    #[test]
    fn pressure_attaches_and_only_a_calm_minute_detaches() {
        let mut arming = FdProbeArming::new();
        arming.observe(0.0);
        assert_eq!(arming.observe(0.49), None);
        assert_eq!(arming.observe(0.5), Some(true));
        assert_eq!(arming.observe(0.9), None);
        // Hovering between the thresholds keeps them attached and restarts the count.
        for _ in 0..3 * CALM_SAMPLES_TO_DISARM {
            assert_eq!(arming.observe(0.45), None);
        }
        for _ in 1..CALM_SAMPLES_TO_DISARM {
            assert_eq!(arming.observe(0.1), None);
        }
        assert_eq!(arming.observe(0.1), Some(false));
        // A spike in the calm period restarts it.
        assert_eq!(arming.observe(0.6), Some(true));
        assert_eq!(arming.observe(0.1), None);
        assert_eq!(arming.observe(0.7), None);
        assert!(arming.is_armed());
    }

    fn process(open_fds: u64, soft_nofile: u64) -> ProcessUsage {
        ProcessUsage {
            pid: 1,
            comm: "client".into(),
            netns: 1,
            open_fds,
            soft_nofile,
            connections: Default::default(),
            listening_sockets: Default::default(),
            client_spread: Default::default(),
        }
    }

    #[test]
    fn peak_usage_is_the_fullest_process_or_the_host() {
        let mut snapshot = Snapshot::default();
        assert_eq!(peak_fd_usage(&snapshot), 0.0);
        snapshot.processes = vec![process(10, 1024), process(600, 1024), process(5, u64::MAX)];
        assert_eq!(peak_fd_usage(&snapshot), 600.0 / 1024.0);
        snapshot.file_handles = Some(FileHandles {
            open: 900,
            max: 1000,
        });
        assert_eq!(peak_fd_usage(&snapshot), 0.9);
        snapshot.file_handles = Some(FileHandles {
            open: 900,
            max: u64::MAX,
        });
        assert_eq!(peak_fd_usage(&snapshot), 600.0 / 1024.0);
        // A zero limit with descriptors open is full, and arms the probes.
        snapshot.processes = vec![process(3, 0)];
        snapshot.file_handles = None;
        assert_eq!(peak_fd_usage(&snapshot), 1.0);
        let mut arming = FdProbeArming::new();
        assert_eq!(arming.observe(peak_fd_usage(&snapshot)), None);
        assert!(arming.is_armed());
    }
}
