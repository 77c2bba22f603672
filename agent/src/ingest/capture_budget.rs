//! Keeps payload decoding within a budget of captured records per second, so a busy cache host
//! pays a bounded cost for decoding however many operations it serves.
//!
//! Above the budget the kernel follows one healthy connection in 2^shift (see
//! [`agent_common::capture_sample`]: a connection is its socket address and ports, so each new
//! connection is a fresh draw) and marks each record with the shift it was captured under;
//! request counters then count each decoded request 2^shift times (an unbiased estimate),
//! while latency histograms and hit ratios come from the followed connections as they are.
//! Connections in trouble (peer closed, reset) are always captured and count once.

use agent_common::capture_sample::MAX_SHIFT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureBudget {
    /// Captured records per second the agent decodes before it samples; 0 = no limit.
    records_per_second: u64,
    shift: u32,
}

impl CaptureBudget {
    pub fn new(records_per_second: u64) -> Self {
        CaptureBudget {
            records_per_second,
            shift: 0,
        }
    }

    /// The current sample shift: one followed connection in 2^shift.
    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// Weight of a request decoded now: how many requests it stands for.
    pub fn weight(&self) -> u64 {
        1 << self.shift
    }

    pub fn set_budget(&mut self, records_per_second: u64) {
        self.records_per_second = records_per_second;
    }

    /// Whether `records` in `interval_s` exceed the budget.
    pub fn is_over(&self, records: u64, interval_s: f64) -> bool {
        self.records_per_second != 0 && records as f64 > self.records_per_second as f64 * interval_s
    }

    /// Called once per interval with the records captured in it; returns the new shift when it
    /// changes. Down at once (as far as needed) when over budget; up one step at a time, and
    /// only when twice the current rate would still leave a fifth of the budget spare, so a
    /// steady load does not flip between two shifts.
    pub fn observe(&mut self, records: u64, interval_s: f64) -> Option<u32> {
        let before = self.shift;
        if self.records_per_second == 0 {
            self.shift = 0;
        } else if interval_s > 0.0 {
            let rate = records as f64 / interval_s;
            let budget = self.records_per_second as f64;
            if rate > budget {
                let steps = (rate / budget).log2().ceil().max(1.0) as u32;
                self.shift = (self.shift + steps).min(MAX_SHIFT);
            } else if self.shift > 0 && rate * 2.0 <= budget * 0.8 {
                self.shift -= 1;
            }
        }
        (self.shift != before).then_some(self.shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_budget_nothing_is_sampled() {
        let mut budget = CaptureBudget::new(25_000);
        assert_eq!(budget.observe(24_000, 1.0), None);
        assert_eq!(budget.shift(), 0);
        assert_eq!(budget.weight(), 1);
    }

    #[test]
    fn over_budget_samples_enough_at_once_and_recovers_step_by_step() {
        let mut budget = CaptureBudget::new(25_000);
        // 400k records/s is 16x the budget: straight to one in 16.
        assert_eq!(budget.observe(400_000, 1.0), Some(4));
        assert_eq!(budget.weight(), 16);
        // At one in 16 the load shows as ~25k: within budget, no flapping.
        assert_eq!(budget.observe(25_000, 1.0), None);
        assert_eq!(budget.observe(12_000, 1.0), None);
        // The load falls: one step up per interval while doubling stays well within budget.
        assert_eq!(budget.observe(2_000, 1.0), Some(3));
        assert_eq!(budget.observe(4_000, 1.0), Some(2));
        assert_eq!(budget.observe(8_000, 1.0), Some(1));
        assert_eq!(budget.observe(9_000, 1.0), Some(0));
        assert_eq!(budget.observe(9_000, 1.0), None);
    }

    #[test]
    fn the_shift_is_bounded_and_no_budget_means_no_sampling() {
        let mut budget = CaptureBudget::new(1);
        assert_eq!(budget.observe(u64::MAX, 1.0), Some(MAX_SHIFT));
        assert_eq!(budget.observe(u64::MAX, 1.0), None);
        budget.set_budget(0);
        assert_eq!(budget.observe(u64::MAX, 1.0), Some(0));
        assert_eq!(budget.observe(0, 0.0), None);
    }

    #[test]
    fn over_budget_is_judged_per_second_of_the_interval() {
        let budget = CaptureBudget::new(10_000);
        assert!(!budget.is_over(1_000, 0.1));
        assert!(budget.is_over(1_001, 0.1));
        assert!(!CaptureBudget::new(0).is_over(u64::MAX, 0.1));
    }

    #[test]
    fn rates_are_per_second_of_the_interval() {
        let mut budget = CaptureBudget::new(10_000);
        assert_eq!(budget.observe(15_000, 2.0), None);
        assert_eq!(budget.observe(30_000, 2.0), Some(1));
    }
}
