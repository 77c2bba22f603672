//! A small fixed log-scale latency histogram: two buckets per doubling from 8 us to ~17 s, so
//! quantiles are within about 19% of the truth while a second's worth of one series costs at
//! most 176 bytes (dense, while the second is open) and usually a few dozen (sparse, frozen).

/// Bucket 0 holds latencies below 8 us; bucket `i` in 1..=42 holds [8 * 2^((i-1)/2),
/// 8 * 2^(i/2)) us; the last bucket holds everything from ~16.8 s up.
pub const BUCKETS: usize = 44;

/// A frozen cell packs the bucket index in the top 6 bits and the count in the low 26 bits.
const COUNT_BITS: u32 = 26;
const COUNT_MASK: u32 = (1 << COUNT_BITS) - 1;

/// The bucket a latency falls in.
pub fn bucket_of(latency_us: u32) -> usize {
    if latency_us < 8 {
        return 0;
    }
    let us = latency_us as u64;
    let log2 = 63 - us.leading_zeros() as u64;
    // floor(2 * log2(us)): add one when us >= 2^log2 * sqrt(2), i.e. us^2 >= 2^(2*log2+1).
    let half_steps = 2 * log2 + u64::from(us * us >= 1u64 << (2 * log2 + 1));
    // 8 us = 2^3 is half-step 6 and bucket 1.
    ((half_steps - 5) as usize).min(BUCKETS - 1)
}

/// Lower bound of a bucket in microseconds.
pub fn bucket_lower_us(bucket: usize) -> f64 {
    if bucket == 0 {
        0.0
    } else {
        8.0 * 2f64.powf((bucket - 1) as f64 / 2.0)
    }
}

/// Where counting "at least `threshold_us`" by bucket really starts: the lower bound of the
/// bucket that holds the threshold (200 ms -> 185 ms). Starting at the next bucket instead
/// (262 ms) would leave out everything between, e.g. a stall of one 200 ms retransmit timeout.
pub fn bucket_floor_us(threshold_us: f64) -> f64 {
    // Latencies are whole microseconds: a fractional threshold (a bucket bound) rounds up.
    bucket_lower_us(bucket_of(
        threshold_us.ceil().clamp(0.0, u32::MAX as f64) as u32
    ))
}

/// A representative value for a bucket: its geometric middle (4 us for the first bucket, the
/// lower bound for the open-ended last one).
pub fn bucket_value_us(bucket: usize) -> f64 {
    match bucket {
        0 => 4.0,
        b if b >= BUCKETS - 1 => bucket_lower_us(b),
        b => bucket_lower_us(b) * 2f64.powf(0.25),
    }
}

/// Dense counts per bucket, for merging and quantiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: [0; BUCKETS],
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, latency_us: u32) {
        self.counts[bucket_of(latency_us)] += 1;
    }

    pub fn add_cells(&mut self, cells: &[u32]) {
        for &cell in cells {
            let (bucket, count) = unpack(cell);
            if let Some(slot) = self.counts.get_mut(bucket) {
                *slot += count as u64;
            }
        }
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Requests at or above `threshold_us`, by bucket: from the bucket that holds it (see
    /// [`bucket_floor_us`]), so every detector counts "at least X" by one rule.
    pub fn count_at_least(&self, threshold_us: f64) -> u64 {
        let first = bucket_of(threshold_us.ceil().clamp(0.0, u32::MAX as f64) as u32);
        self.counts[first..].iter().sum()
    }

    /// The `q` quantile (0..=1) in microseconds, or None when empty.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the q-quantile, 1-based, at least 1.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_value_us(bucket));
            }
        }
        Some(bucket_value_us(BUCKETS - 1))
    }

    /// The largest non-empty bucket's representative value.
    pub fn max_us(&self) -> Option<f64> {
        self.counts
            .iter()
            .rposition(|&c| c > 0)
            .map(bucket_value_us)
    }

    /// Approximate mean from bucket representatives.
    pub fn mean_us(&self) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let sum: f64 = self
            .counts
            .iter()
            .enumerate()
            .map(|(b, &c)| bucket_value_us(b) * c as f64)
            .sum();
        Some(sum / total as f64)
    }
}

/// Per-second dense counts while a second is open; frozen into packed sparse cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SecondHistogram {
    Dense(Box<[u32; BUCKETS]>),
    Sparse(Box<[u32]>),
}

impl Default for SecondHistogram {
    fn default() -> Self {
        SecondHistogram::Dense(Box::new([0; BUCKETS]))
    }
}

impl SecondHistogram {
    pub(crate) fn record(&mut self, latency_us: u32) {
        self.thaw();
        if let SecondHistogram::Dense(counts) = self {
            let slot = &mut counts[bucket_of(latency_us)];
            // A packed cell holds 2^26 - 1; no single series sees that many requests a second.
            *slot = (*slot + 1).min(COUNT_MASK);
        }
    }

    pub(crate) fn freeze(&mut self) {
        if let SecondHistogram::Dense(counts) = self {
            let cells: Box<[u32]> = counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(b, &c)| pack(b, c))
                .collect();
            *self = SecondHistogram::Sparse(cells);
        }
    }

    pub(crate) fn thaw(&mut self) {
        if let SecondHistogram::Sparse(cells) = self {
            let mut counts = Box::new([0u32; BUCKETS]);
            for &cell in cells.iter() {
                let (bucket, count) = unpack(cell);
                if let Some(slot) = counts.get_mut(bucket) {
                    *slot = count;
                }
            }
            *self = SecondHistogram::Dense(counts);
        }
    }

    /// Packed sparse cells (for snapshots).
    pub(crate) fn cells(&self) -> Vec<u32> {
        match self {
            SecondHistogram::Dense(counts) => counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(b, &c)| pack(b, c))
                .collect(),
            SecondHistogram::Sparse(cells) => cells.to_vec(),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            SecondHistogram::Dense(_) => BUCKETS * 4,
            SecondHistogram::Sparse(cells) => cells.len() * 4,
        }
    }
}

pub fn pack(bucket: usize, count: u32) -> u32 {
    ((bucket as u32) << COUNT_BITS) | count.min(COUNT_MASK)
}

pub fn unpack(cell: u32) -> (usize, u32) {
    ((cell >> COUNT_BITS) as usize, cell & COUNT_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_half_doublings_from_8_us() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(7), 0);
        assert_eq!(bucket_of(8), 1);
        assert_eq!(bucket_of(11), 1);
        assert_eq!(bucket_of(12), 2); // 8 * sqrt2 = 11.3
        assert_eq!(bucket_of(16), 3);
        assert_eq!(bucket_of(u32::MAX), BUCKETS - 1);
        let floor = bucket_floor_us(200_000.0);
        assert!((185_000.0..200_000.0).contains(&floor), "{floor}");
        assert_eq!(bucket_floor_us(floor), floor);
        for us in [8u32, 100, 1000, 65_000, 1_000_000, 16_000_000] {
            let b = bucket_of(us);
            assert!(bucket_lower_us(b) <= us as f64 + 1e-9, "{us} in {b}");
            if b + 1 < BUCKETS {
                assert!((us as f64) < bucket_lower_us(b + 1), "{us} below {}", b + 1);
            }
        }
    }

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut hist = LatencyHistogram::default();
        for us in 1..=1000u32 {
            hist.record(us * 10);
        }
        let p50 = hist.quantile_us(0.5).unwrap();
        let p99 = hist.quantile_us(0.99).unwrap();
        assert!((p50 / 5000.0 - 1.0).abs() < 0.2, "p50 {p50}");
        assert!((p99 / 9900.0 - 1.0).abs() < 0.2, "p99 {p99}");
        assert_eq!(hist.count(), 1000);
        assert!(LatencyHistogram::default().quantile_us(0.5).is_none());
    }

    #[test]
    fn freeze_and_thaw_keep_counts() {
        let mut second = SecondHistogram::default();
        for us in [5, 100, 100, 2000, 40_000_000] {
            second.record(us);
        }
        let dense = second.cells();
        second.freeze();
        assert!(matches!(second, SecondHistogram::Sparse(ref c) if c.len() == 4));
        assert_eq!(second.cells(), dense);
        second.record(100);
        let mut hist = LatencyHistogram::default();
        hist.add_cells(&second.cells());
        assert_eq!(hist.count(), 6);
        assert_eq!(hist.count_at_least(1_000_000.0), 1);
    }

    #[test]
    fn at_least_counts_from_the_bucket_holding_the_threshold() {
        let mut hist = LatencyHistogram::default();
        for us in [9_000, 10_500, 12_000, 5_000] {
            hist.record(us);
        }
        // 9 and 10.5 ms share the bucket holding 10 ms (8.2-11.6 ms).
        assert_eq!(hist.count_at_least(10_000.0), 3);
        assert_eq!(
            hist.count_at_least(10_000.0),
            hist.count_at_least(bucket_floor_us(10_000.0))
        );
    }
}
