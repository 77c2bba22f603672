//! Turns the kernel's running totals (losses, program run time) and the decoders' own drops into
//! counter increments, remembering what each total was at the last tick.

use std::collections::HashMap;

use crate::{
    export::metrics::{Metrics, ProgramLabels, SourceLabels},
    kernel::readings::KernelReadings,
};

#[derive(Debug, Default)]
pub struct KernelStats {
    losses_seen: HashMap<&'static str, u64>,
    /// Run time (ns) and runs per program at the last reading.
    program_stats_seen: HashMap<String, (u64, u64)>,
}

impl KernelStats {
    /// Adds what each total grew by since the last reading.
    pub fn apply(&mut self, readings: &KernelReadings, metrics: &Metrics) {
        for &(source, total) in readings.losses.iter().flatten() {
            let seen = self.losses_seen.entry(source).or_insert(0);
            if total > *seen {
                metrics
                    .events_lost
                    .get_or_create(&SourceLabels { source })
                    .inc_by(total - *seen);
                *seen = total;
            }
        }
        for (program, run_time, runs) in readings.program_stats.iter().flatten() {
            let seen = self
                .program_stats_seen
                .entry(program.clone())
                .or_insert((0, 0));
            let labels = ProgramLabels {
                program: program.clone(),
            };
            let run_ns = run_time.as_nanos() as u64;
            if run_ns > seen.0 {
                metrics
                    .bpf_run_seconds
                    .get_or_create(&labels)
                    .inc_by((run_ns - seen.0) as f64 / 1e9);
            }
            if *runs > seen.1 {
                metrics
                    .bpf_runs
                    .get_or_create(&labels)
                    .inc_by(runs - seen.1);
            }
            *seen = (run_ns.max(seen.0), (*runs).max(seen.1));
        }
    }
}

/// Counts `lost` records of a user-space `source` (queue flow, decoder table) as lost events.
pub fn count_lost(metrics: &Metrics, source: &'static str, lost: u64) {
    if lost > 0 {
        metrics
            .events_lost
            .get_or_create(&SourceLabels { source })
            .inc_by(lost);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn lost(metrics: &Metrics, source: &'static str) -> u64 {
        metrics
            .events_lost
            .get_or_create(&SourceLabels { source })
            .get()
    }

    /// Totals become increments; a reading that failed, or a total that went back (a reload of
    /// the programs), adds nothing.
    #[test]
    fn totals_become_increments() {
        let (metrics, _) = Metrics::new();
        let mut stats = KernelStats::default();
        let reading = |ringbuf: u64, runs: u64| KernelReadings {
            losses: Some(vec![("ringbuf", ringbuf), ("frame_map", 0)]),
            program_stats: Some(vec![(
                "sock_state".to_string(),
                Duration::from_millis(runs),
                runs,
            )]),
        };
        stats.apply(&reading(3, 10), &metrics);
        stats.apply(&KernelReadings::default(), &metrics);
        stats.apply(&reading(5, 25), &metrics);
        stats.apply(&reading(4, 20), &metrics);
        assert_eq!(lost(&metrics, "ringbuf"), 5);
        assert_eq!(lost(&metrics, "frame_map"), 0);
        let labels = ProgramLabels {
            program: "sock_state".into(),
        };
        assert_eq!(metrics.bpf_runs.get_or_create(&labels).get(), 25);
        let seconds = metrics.bpf_run_seconds.get_or_create(&labels).get();
        assert!((seconds - 0.025).abs() < 1e-9, "{seconds}");
        count_lost(&metrics, "decoder", 0);
        count_lost(&metrics, "decoder", 2);
        assert_eq!(lost(&metrics, "decoder"), 2);
    }
}
