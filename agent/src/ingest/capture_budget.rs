//! Keeps payload decoding within a budget of captured records per second, so a busy cache host
//! pays a bounded cost for decoding however many operations it serves.
//!
//! Above the budget the kernel follows one healthy connection in 2^shift (see
//! [`agent_common::capture_sample`]: a connection is its socket address and ports, so each new
//! connection is a fresh draw) and marks each record with the shift it was captured under;
//! request counters then count each decoded request seen/followed times, the kernel's counts
//! of calls on all eligible connections of that service and role and on the followed ones in
//! the last interval (a ratio estimator; 2^shift when the counts are unavailable), while latency
//! histograms and hit ratios come from the followed connections as they are.
//! Connections in trouble (peer closed, reset) are always captured and count once.
//!
//! Why calls and not 2^shift: with tens of connections the number followed is a binomial
//! draw fixed for the connections' lifetime, and 2^shift x decoded was off by 30-80% per 5 s
//! window at the default budget (BENCHMARKS.md, decoding budget). The ratio corrects for the
//! draw; it is exact when requests per call are alike across a service's connections.

use agent_common::{capture_sample::MAX_SHIFT, watch, SampledCalls};

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

/// Payload records between looks at the decoding budget while they stream in.
const BUDGET_CHECK_RECORDS: u64 = 1024;

/// The budget at work on the record stream, and the handshake with the kernel that follows a
/// new sample: the pipeline counts records here, is told when the sample changes, hands the
/// new shift to the caller (which tells the kernel) and hears back when the kernel follows it.
#[derive(Debug)]
pub struct CaptureSampling {
    budget: CaptureBudget,
    /// Payload records handled since the budget was last checked, and when that was.
    records_since_check: u64,
    last_check_ns: u64,
    /// A sample shift the kernel has yet to be told (see [`CaptureSampling::take_shift`]).
    pending_shift: Option<u32>,
    /// When the kernel was last told a new sample (monotonic ns).
    shift_applied_ns: u64,
    ratios: CallRatios,
}

/// The ratio weights by `SAMPLED_CALLS` index, from the kernel's counters.
#[derive(Debug)]
struct CallRatios {
    /// Totals at the last reading, and when it was (monotonic ns; 0: none yet).
    last: Vec<SampledCalls>,
    last_ns: u64,
    /// seen / followed calls of the last interval with traffic; None: fall back to 2^shift.
    ratio: Vec<Option<f64>>,
    /// `SAMPLED_CALLS` slot by service id (0: none).
    slots: Vec<u32>,
    /// Draws for rounding fractional weights (see [`take_weight`]).
    rounding: Rounding,
}

impl Default for CallRatios {
    fn default() -> Self {
        CallRatios {
            last: Vec::new(),
            last_ns: 0,
            ratio: Vec::new(),
            slots: Vec::new(),
            rounding: Rounding(0x9e37_79b9_7f4a_7c15),
        }
    }
}

/// What one index's counters say about the interval between two readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IntervalRatio {
    /// seen / followed calls.
    Ratio(f64),
    /// No call at all: nothing to learn, the last ratio stands.
    Idle,
    /// Calls, none followed, or totals that went back (a reloaded object): no ratio.
    NoRatio,
}

/// seen / followed calls between two readings of one index.
pub fn interval_ratio(before: SampledCalls, now: SampledCalls) -> IntervalRatio {
    let (Some(seen), Some(followed)) = (
        now.seen.checked_sub(before.seen),
        now.followed.checked_sub(before.followed),
    ) else {
        return IntervalRatio::NoRatio;
    };
    if seen == 0 {
        IntervalRatio::Idle
    } else if followed == 0 || followed > seen {
        IntervalRatio::NoRatio
    } else {
        IntervalRatio::Ratio(seen as f64 / followed as f64)
    }
}

/// A xorshift64 stream of uniform draws in [0, 1).
#[derive(Debug)]
struct Rounding(u64);

impl Rounding {
    fn next(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The whole requests one decoded request stands for at `ratio`, given a uniform draw `u` in
/// [0, 1): floor(ratio), plus one with probability frac(ratio). Counters stay integers and
/// every series' expected count is its share times the ratio: no fraction is dropped, and no
/// series is favoured (a remainder carried from one request to the next would hand the
/// rounding up to whichever command follows a rounded-down one, e.g. all gets in a set/get
/// alternation at 4.5). The rounding adds a variance of at most 1/4 per request.
pub fn take_weight(ratio: f64, u: f64) -> u64 {
    let whole = ratio.floor();
    whole as u64 + u64::from(u < ratio - whole)
}

impl CaptureSampling {
    pub fn new(records_per_second: u64) -> Self {
        CaptureSampling {
            budget: CaptureBudget::new(records_per_second),
            records_since_check: 0,
            last_check_ns: 0,
            pending_shift: None,
            shift_applied_ns: 0,
            ratios: CallRatios::default(),
        }
    }

    /// The `SAMPLED_CALLS` slot of each service id (see [`watch::slot_of_position`]).
    pub fn set_service_slots(&mut self, slots: Vec<u32>) {
        self.ratios.slots = slots;
    }

    /// The kernel's totals of sampled calls at `now_ns` (None: unreadable, e.g. an older
    /// object): the ratios of the interval since the last reading. An interval in which the
    /// sample changed mixes two samples and gives no ratio (2^shift until the next one).
    pub fn observe_sampled_calls(&mut self, totals: Option<&[SampledCalls]>, now_ns: u64) {
        let ratios = &mut self.ratios;
        let Some(totals) = totals else {
            ratios.ratio.clear();
            ratios.last.clear();
            return;
        };
        let straddles = ratios.last_ns == 0 || self.shift_applied_ns >= ratios.last_ns;
        let previous = std::mem::take(&mut ratios.ratio);
        ratios.ratio = totals
            .iter()
            .enumerate()
            .map(|(index, &now)| {
                let before = *ratios.last.get(index)?;
                if straddles {
                    return None;
                }
                match interval_ratio(before, now) {
                    IntervalRatio::Ratio(ratio) => Some(ratio),
                    IntervalRatio::Idle => previous.get(index).copied().flatten(),
                    IntervalRatio::NoRatio => None,
                }
            })
            .collect();
        ratios.last = totals.to_vec();
        ratios.last_ns = now_ns;
    }

    /// How many requests a request decoded on a connection of `service` (`client`: the client
    /// role) stands for: [`CaptureSampling::weight_of_record`], with a sampled one weighted by
    /// the service and role's call ratio when there is one.
    pub fn weight_of_request(
        &mut self,
        sample_shift: Option<u32>,
        sample_depth: u32,
        service: usize,
        client: bool,
    ) -> Option<u64> {
        let weight = self.weight_of_record(sample_shift, sample_depth)?;
        if sample_shift.is_none() {
            return Some(weight);
        }
        let ratios = &mut self.ratios;
        let slot = ratios.slots.get(service).copied().unwrap_or(0);
        if slot == 0 {
            return Some(weight);
        }
        let index = watch::calls_index(slot, client) as usize;
        match ratios.ratio.get(index).copied().flatten() {
            Some(ratio) => Some(take_weight(ratio, ratios.rounding.next())),
            None => Some(weight),
        }
    }

    /// Decodes every connection whatever the rate (the kernel cannot sample).
    pub fn disable(&mut self) {
        self.budget.set_budget(0);
    }

    /// The current sample shift: one followed connection in 2^shift.
    pub fn shift(&self) -> u32 {
        self.budget.shift()
    }

    /// How many requests each request decoded from a followed connection stands for.
    pub fn weight(&self) -> u64 {
        self.budget.weight()
    }

    /// How many calls a record stands for, from the sample the kernel marked it with
    /// (`sample_shift`, None when captured for its connection's trouble, and the connection's
    /// `sample_depth`); None when the record is dropped.
    ///
    /// A sampled call was followed with probability 2^-shift, so it counts 2^shift (each
    /// request's expected count is then its true one, whichever connections the sample drew).
    /// The shift is the kernel's when it wrote the record, or the agent's if that is narrower
    /// already: a call written before the kernel heard of a narrower sample, from a stream that
    /// sample lets go, is dropped (its stream's other half will never come, so decoding it would
    /// invent timeouts), and the calls kept from the streams it keeps stand for as many as the
    /// new ones. A call captured for its connection's trouble (or by a kernel that cannot tell
    /// healthy connections) was not sampled: it counts once.
    pub fn weight_of_record(&self, sample_shift: Option<u32>, sample_depth: u32) -> Option<u64> {
        match sample_shift {
            Some(recorded) => {
                let shift = recorded.max(self.budget.shift()).min(MAX_SHIFT);
                (sample_depth >= shift).then_some(1u64 << shift)
            }
            None => Some(1),
        }
    }

    /// The shift the kernel marks a record written at `ts_ns` with in tests that start at
    /// shift 0: the current one once the kernel was told it, 0 before.
    #[cfg(test)]
    pub fn kernel_shift_at(&self, ts_ns: u64) -> u32 {
        if self.pending_shift.is_none() && ts_ns > self.shift_applied_ns {
            self.budget.shift()
        } else {
            0
        }
    }

    /// A new sample shift for the kernel, once, after the look that chose it.
    pub fn take_shift(&mut self) -> Option<u32> {
        self.pending_shift.take()
    }

    /// The kernel follows the sample from [`CaptureSampling::take_shift`] since `now_ns`.
    pub fn shift_applied(&mut self, now_ns: u64) {
        self.shift_applied_ns = now_ns;
        // The last interval's ratios are of the old sample: 2^shift until a clean interval.
        self.ratios.ratio.clear();
        // The next budget window starts now: records written under the old sample, still in
        // the ring, would make the new sample look too busy and narrow it again at once.
        self.last_check_ns = now_ns;
        self.records_since_check = 0;
    }

    /// Counts one payload record written at `ts_ns`, looking at the budget every
    /// [`BUDGET_CHECK_RECORDS`]; returns the new shift when that look changed the sample.
    pub fn count_record(&mut self, ts_ns: u64) -> Option<u32> {
        if ts_ns <= self.shift_applied_ns {
            return None;
        }
        self.records_since_check += 1;
        if self
            .records_since_check
            .is_multiple_of(BUDGET_CHECK_RECORDS)
        {
            self.check(ts_ns)
        } else {
            None
        }
    }

    /// Checks the decoding budget: about once a second, or as soon as a tenth of a second
    /// shows the rate over budget (the payload ring must not fill while the agent waits).
    /// Returns the new shift when the sample changes; the caller then drops the streams no
    /// longer followed at once, so their open requests never read as timeouts.
    pub fn check(&mut self, now_ns: u64) -> Option<u32> {
        if self.last_check_ns == 0 {
            self.last_check_ns = now_ns;
            self.records_since_check = 0;
            return None;
        }
        // Records are stamped when the kernel wrote them, ticks when they run: a record older
        // than the last look just counts towards the window that started then.
        let elapsed_ns = now_ns.checked_sub(self.last_check_ns)?;
        let interval_s = elapsed_ns as f64 / 1e9;
        let over_budget = self.budget.is_over(self.records_since_check, interval_s);
        if interval_s < 1.0 && !(interval_s >= 0.1 && over_budget) {
            return None;
        }
        let records = std::mem::take(&mut self.records_since_check);
        self.last_check_ns = now_ns;
        let shift = self.budget.observe(records, interval_s)?;
        tracing::info!(
            records_per_second = (records as f64 / interval_s) as u64,
            followed = format!("1/{}", 1u64 << shift),
            "payload decoding budget: capture sample changed"
        );
        self.pending_shift = Some(shift);
        // Records of the streams kept now weigh the new sample (see `weight_of_record`).
        self.ratios.ratio.clear();
        Some(shift)
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

    /// Over budget the sample narrows once, is handed over once, and records the kernel wrote
    /// before it followed the new sample are dropped for released streams only.
    #[test]
    fn the_handshake_hands_a_new_sample_over_once() {
        const SECOND: u64 = 1_000_000_000;
        let mut sampling = CaptureSampling::new(500);
        assert_eq!(
            sampling.check(SECOND),
            None,
            "the first look starts a window"
        );
        for i in 0..1_000 {
            assert_eq!(sampling.count_record(SECOND + 1 + i), None);
        }
        assert_eq!(sampling.check(2 * SECOND), Some(1));
        // A record the kernel wrote under the old sample (shift 0), of a stream the new one
        // lets go (depth 0): dropped; of a stream it keeps (depth 1): counts for the new 2.
        assert_eq!(sampling.weight_of_record(Some(0), 0), None);
        assert_eq!(sampling.weight_of_record(Some(0), 1), Some(2));
        assert_eq!(sampling.take_shift(), Some(1));
        assert_eq!(sampling.take_shift(), None);
        sampling.shift_applied(2 * SECOND + 10);
        assert_eq!(sampling.weight_of_record(Some(1), 3), Some(2));
        assert_eq!(
            sampling.weight_of_record(None, 0),
            Some(1),
            "captured for its trouble"
        );
        // Records from before the switch do not count towards the new window.
        for i in 0..2_048 {
            assert_eq!(sampling.count_record(SECOND + i), None);
        }
        assert_eq!(
            sampling.check(3 * SECOND + 10),
            Some(0),
            "an idle second widens it"
        );
    }

    fn calls(seen: u64, followed: u64) -> SampledCalls {
        SampledCalls { seen, followed }
    }

    #[test]
    fn the_ratio_is_seen_over_followed_calls_of_the_interval() {
        use IntervalRatio::*;
        assert_eq!(
            interval_ratio(calls(100, 10), calls(1_100, 60)),
            Ratio(20.0)
        );
        assert_eq!(interval_ratio(calls(0, 0), calls(7, 7)), Ratio(1.0));
        assert_eq!(interval_ratio(calls(7, 1), calls(7, 1)), Idle);
        assert_eq!(
            interval_ratio(calls(5, 1), calls(50, 1)),
            NoRatio,
            "none followed"
        );
        assert_eq!(
            interval_ratio(calls(50, 5), calls(10, 1)),
            NoRatio,
            "totals went back"
        );
    }

    /// Fractions are rounded up as often as they are worth: 100,000 requests at 2.37 add up to
    /// 237,000 within 4 sd of the rounding (sqrt(n * 0.37 * 0.63) = 153), and each series of an
    /// alternation gets its own share (no carry handing the remainder to one of them).
    #[test]
    fn fractional_weights_add_up_in_every_series() {
        let mut draws = Rounding(1);
        let (mut odd, mut even) = (0u64, 0u64);
        for i in 0..100_000 {
            let weight = take_weight(2.37, draws.next());
            assert!(weight == 2 || weight == 3);
            if i % 2 == 0 {
                even += weight;
            } else {
                odd += weight;
            }
        }
        assert!((odd + even).abs_diff(237_000) < 4 * 153, "{}", odd + even);
        assert!(odd.abs_diff(118_500) < 4 * 108, "{odd}");
        assert!(even.abs_diff(118_500) < 4 * 108, "{even}");
        assert_eq!(take_weight(4.0, 0.999), 4);
        assert_eq!(take_weight(1.0, 0.0), 1);
    }

    /// A sampled request weighs its service and role's call ratio once the kernel has been
    /// read twice under one sample; before that, and without counters, 2^shift.
    #[test]
    fn sampled_requests_weigh_the_call_ratio_of_their_service_and_role() {
        const SECOND: u64 = 1_000_000_000;
        let mut sampling = CaptureSampling::new(500);
        // Service id 0 has slot 1, id 1 has none (past the 63rd).
        sampling.set_service_slots(vec![1, 0]);
        sampling.budget.shift = 2;
        let server = watch::calls_index(1, false) as usize;
        let client = watch::calls_index(1, true) as usize;
        let mut totals =
            vec![SampledCalls::default(); agent_common::SAMPLED_CALLS_ENTRIES as usize];
        sampling.observe_sampled_calls(Some(&totals), SECOND);
        assert_eq!(
            sampling.weight_of_request(Some(2), 5, 0, false),
            Some(4),
            "no interval yet"
        );
        totals[server] = calls(1_000, 100);
        totals[client] = calls(1_000, 500);
        sampling.observe_sampled_calls(Some(&totals), 2 * SECOND);
        assert_eq!(sampling.weight_of_request(Some(2), 5, 0, false), Some(10));
        assert_eq!(sampling.weight_of_request(Some(2), 5, 0, true), Some(2));
        assert_eq!(
            sampling.weight_of_request(Some(2), 5, 1, false),
            Some(4),
            "no slot"
        );
        assert_eq!(
            sampling.weight_of_request(None, 0, 0, false),
            Some(1),
            "trouble"
        );
        assert_eq!(
            sampling.weight_of_request(Some(2), 1, 0, false),
            None,
            "let go"
        );
        // The sample changes: the next interval mixes two samples and gives no ratio.
        sampling.shift_applied(2 * SECOND + 5);
        totals[server] = calls(2_000, 150);
        sampling.observe_sampled_calls(Some(&totals), 3 * SECOND);
        assert_eq!(sampling.weight_of_request(Some(2), 5, 0, false), Some(4));
        totals[server] = calls(3_000, 250);
        sampling.observe_sampled_calls(Some(&totals), 4 * SECOND);
        assert_eq!(sampling.weight_of_request(Some(2), 5, 0, false), Some(10));
        // An idle interval keeps the ratio; calls none of which were followed drop it.
        sampling.observe_sampled_calls(Some(&totals), 5 * SECOND);
        assert_eq!(sampling.weight_of_request(Some(2), 5, 0, false), Some(10));
        totals[server] = calls(3_100, 250);
        sampling.observe_sampled_calls(Some(&totals), 6 * SECOND);
        assert_eq!(sampling.weight_of_request(Some(2), 5, 0, false), Some(4));
        // Counters gone (an object without them): back to 2^shift.
        sampling.observe_sampled_calls(None, 7 * SECOND);
        assert_eq!(sampling.weight_of_request(Some(2), 5, 0, false), Some(4));
    }

    #[test]
    fn rates_are_per_second_of_the_interval() {
        let mut budget = CaptureBudget::new(10_000);
        assert_eq!(budget.observe(15_000, 2.0), None);
        assert_eq!(budget.observe(30_000, 2.0), Some(1));
    }
}
