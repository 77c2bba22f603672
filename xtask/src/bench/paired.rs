//! Paired off/on statistics and the network namespace that lets the bench watch only one end.
//!
//! Each round compares an agent-on run with an agent-off run seconds away, so drift of a shared
//! machine cancels within the pair; the loss over rounds is reported as a median with a
//! percentile-bootstrap 95% confidence interval.

use std::{os::fd::AsRawFd, process::Command, time::Duration};

use anyhow::{bail, Context as _};

use super::{procs, report::median};

/// A median and its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub median: f64,
    pub low: f64,
    pub high: f64,
}

/// What a goal "at most `limit`" comes to given an interval: met only when the whole interval
/// is under it, missed only when the whole interval is over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// The interval straddles the goal: these rounds cannot tell.
    Undecided,
}

impl Verdict {
    /// The status cell of a targets table.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Undecided => "**not shown** (the interval straddles the goal)",
        }
    }
}

impl Interval {
    pub fn against(&self, limit: f64) -> Verdict {
        if self.high <= limit {
            Verdict::Met
        } else if self.low > limit {
            Verdict::Missed
        } else {
            Verdict::Undecided
        }
    }
}

/// Resamples behind every interval: enough that the 2.5th and 97.5th percentiles of the
/// bootstrap medians move by well under the rounds' own spread.
pub const RESAMPLES: usize = 10_000;

/// The median of `samples` (per-round paired differences) with a percentile-bootstrap 95%
/// interval: rounds are drawn with replacement, so each draw keeps an on run with its own
/// off run. Deterministic (fixed seed) so a report can be recomputed from its round table.
pub fn median_ci(samples: &[f64]) -> Option<Interval> {
    let center = median(samples)?;
    let samples: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    let mut rng = SplitMix(0x5eed_cafe);
    let mut draw = vec![0.0; samples.len()];
    let mut medians = Vec::with_capacity(RESAMPLES);
    for _ in 0..RESAMPLES {
        for slot in draw.iter_mut() {
            *slot = samples[(rng.next() % samples.len() as u64) as usize];
        }
        medians.push(median(&draw)?);
    }
    medians.sort_by(f64::total_cmp);
    let at = |q: f64| {
        medians[((q * (medians.len() - 1) as f64).round() as usize).min(medians.len() - 1)]
    };
    Some(Interval {
        median: center,
        low: at(0.025),
        high: at(0.975),
    })
}

/// A small deterministic generator (SplitMix64); statistical quality is ample for resampling.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A network namespace of the bench's own, with loopback up and one NAT rule: connections to
/// 127.0.0.1:`watched` land on `served`. A client there talks to port `watched` while the
/// server's socket is on `served`, so an agent watching `watched` sees only the client end, as
/// on a host that runs only clients. The NAT (and its conntrack) lives in this namespace
/// alone and costs the same with the agent off and on.
pub struct Netns {
    pub name: String,
    pub watched: u16,
    pub served: u16,
}

impl Netns {
    pub fn create(watched: u16, served: u16) -> anyhow::Result<Netns> {
        let name = format!("cacheprobe-bench-{}", std::process::id());
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            procs::run_checked("ip", Command::new("ip").args(args), Duration::from_secs(10))
                .map(|_| ())
        };
        ip(&["netns", "add", &name])?;
        let netns = Netns {
            name,
            watched,
            served,
        };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        let (watched, served) = (watched.to_string(), served.to_string());
        procs::run_checked(
            "iptables",
            Command::new("ip").args([
                "netns",
                "exec",
                &netns.name,
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "127.0.0.1",
                "--dport",
                &watched,
                "-j",
                "REDIRECT",
                "--to-ports",
                &served,
            ]),
            Duration::from_secs(10),
        )
        .context("cannot add the NAT rule of the one-end bench (iptables in a new netns)")?;
        Ok(netns)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> [String; 3] {
        ["netns".into(), "exec".into(), self.name.clone()]
    }

    /// Runs `work` on a thread of its own that has entered the namespace (network namespaces
    /// are per thread), so the load generator's sockets live there.
    pub fn run<T: Send>(
        &self,
        work: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a namespace fd, affecting only this thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns into {path}: {}", std::io::Error::last_os_error());
                    }
                    work()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread in {path} panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_holds_the_median_and_narrows_with_agreement() {
        let noisy = [
            -0.046, 0.058, 0.01, 0.02, 0.0, 0.03, -0.01, 0.04, 0.015, 0.025,
        ];
        let interval = median_ci(&noisy).unwrap();
        assert!((interval.median - 0.0175).abs() < 1e-12, "{interval:?}");
        assert!(interval.low <= interval.median && interval.median <= interval.high);
        assert!(interval.low >= -0.046 && interval.high <= 0.058);
        let tight = [
            0.010, 0.011, 0.009, 0.010, 0.012, 0.010, 0.011, 0.009, 0.010, 0.010,
        ];
        let narrow = median_ci(&tight).unwrap();
        assert!(narrow.high - narrow.low < interval.high - interval.low);
        assert_eq!(narrow.against(0.02), Verdict::Met);
        assert_eq!(narrow.against(0.005), Verdict::Missed);
        assert_eq!(interval.against(0.02), Verdict::Undecided);
    }

    #[test]
    fn no_rounds_no_interval() {
        assert_eq!(median_ci(&[]), None);
        assert_eq!(median_ci(&[f64::NAN]), None);
    }
}
