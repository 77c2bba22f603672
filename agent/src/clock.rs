//! The kernel stamps events with CLOCK_MONOTONIC (bpf_ktime_get_ns); user space compares against
//! the same clock.

/// Wall-clock unix seconds (0 if the clock is before 1970), for history and reports.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long a measured offset between the monotonic and the wall clock is reused.
const CLOCK_OFFSET_REUSE_NS: u64 = 1_000_000_000;

/// The unix second of CLOCK_MONOTONIC timestamps with the clock offset cached: two clock reads
/// per second of event time instead of one or two per event (the per-record path used to spend
/// about 5% of its time in `clock_gettime`). Clock steps show up within a second.
#[derive(Debug, Default)]
pub struct MonotonicToUnix {
    /// The event timestamp the offset was measured for (0: never).
    measured_at_ns: u64,
    unix_minus_monotonic_ns: i128,
}

impl MonotonicToUnix {
    /// The unix second `ts_ns` (CLOCK_MONOTONIC) fell in; 0 means now.
    pub fn unix_second(&mut self, ts_ns: u64) -> u64 {
        if ts_ns == 0 {
            return unix_now();
        }
        if self.measured_at_ns == 0 || ts_ns.abs_diff(self.measured_at_ns) >= CLOCK_OFFSET_REUSE_NS
        {
            let now_unix_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128);
            let now_monotonic_ns = monotonic_ns();
            self.unix_minus_monotonic_ns = now_unix_ns - now_monotonic_ns as i128;
            // Anchored to event time, not to now: events are processed milliseconds after they
            // happen, and a backlog (or a replay) must not re-measure on every event.
            self.measured_at_ns = ts_ns;
        }
        let unix_ns = (ts_ns as i128 + self.unix_minus_monotonic_ns).max(0);
        (unix_ns / 1_000_000_000) as u64
    }
}
