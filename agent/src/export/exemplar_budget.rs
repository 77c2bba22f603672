//! Per-second exemplar budgets, with the sampled slice narrowed in nested steps so that both ends of a request keep the same ids when the slice alone would exceed the budget.
//!
//! A plain first-come cap keeps whichever ids each agent happens to see first, and the two ends
//! see a second's requests in different orders: above the budget they would keep different
//! ids and the join in `diagnose --prometheus` would find few pairs. Instead, when the last
//! second's slice overran half the budget, this second's slice is 1 in `one_in << shift`, a
//! subset of the configured one that both ends choose alike from the same traffic. The cap stays
//! as a hard bound (a rise within one second still meets it first-come).

/// Which second the budgets count, what each kind spent in it, and how narrow the slice is.
#[derive(Debug, Default, Clone)]
pub struct ExemplarBudget {
    second: u64,
    slow_used: u32,
    sampled_used: u32,
    /// Ids in the configured (widest) slice seen this second, admitted or not.
    candidates: u32,
    shift: u32,
}

impl ExemplarBudget {
    /// Whether a request with this id, at `ts_ns`, leaves it as an exemplar: slow requests on
    /// their budget, others only inside the (narrowed) slice on a budget of their own.
    pub fn admit(&mut self, id: u64, slow: bool, ts_ns: u64, one_in: u32, per_second: u32) -> bool {
        let second = ts_ns / 1_000_000_000;
        if second != self.second {
            self.roll(second, per_second);
        }
        if !slow {
            if !crate::model::in_exemplar_slice(id, one_in) {
                return false;
            }
            self.candidates = self.candidates.saturating_add(1);
            if !crate::model::in_narrowed_exemplar_slice(id, one_in, self.shift) {
                return false;
            }
        }
        let used = if slow {
            &mut self.slow_used
        } else {
            &mut self.sampled_used
        };
        if *used >= per_second {
            return false;
        }
        *used += 1;
        true
    }

    /// How many halvings of the slice this second uses.
    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// Starts `second`. The slice is narrowed until the last second's candidates would fill
    /// at most half the budget: the headroom absorbs the small differences between what the
    /// two ends count, so neither reaches the first-come cap. After a gap it starts wide again.
    fn roll(&mut self, second: u64, per_second: u32) {
        let target = (per_second / 2).max(1);
        let mut shift = 0;
        if second == self.second.wrapping_add(1) {
            while shift < 31 && (self.candidates >> shift) > target {
                shift += 1;
            }
        }
        *self = ExemplarBudget {
            second,
            shift,
            ..ExemplarBudget::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::ExemplarBudget;
    use std::collections::BTreeSet;

    const SECOND: u64 = 1_000_000_000;

    /// The ids in the configured slice among `n` consecutive request ids of one flow.
    fn slice_ids(n: u32, one_in: u32) -> Vec<u64> {
        let flow = crate::model::flow_id(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:11211".parse().unwrap(),
        )
        .unwrap();
        (0..n)
            .map(|seq| crate::model::request_id(flow, seq.wrapping_mul(31)))
            .filter(|id| crate::model::in_exemplar_slice(*id, one_in))
            .collect()
    }

    fn kept(budget: &mut ExemplarBudget, ids: &[u64], second: u64) -> BTreeSet<u64> {
        ids.iter()
            .copied()
            .filter(|id| budget.admit(*id, false, second * SECOND + 1, 10, 20))
            .collect()
    }

    /// Two ends see the same 5x-over-budget slice in opposite orders each second: after the
    /// first second they keep exactly the same ids, within the budget.
    #[test]
    fn both_ends_keep_the_same_ids_when_the_slice_overruns_the_budget() {
        let ids = slice_ids(20_000, 10);
        let per_second = ids.len() / 10;
        assert!(per_second >= 100, "{}", ids.len());
        let (mut client, mut server) = (ExemplarBudget::default(), ExemplarBudget::default());
        for (second, chunk) in ids.chunks_exact(per_second).enumerate() {
            let second = 100 + second as u64;
            let mut reversed = chunk.to_vec();
            reversed.reverse();
            let at_client = kept(&mut client, chunk, second);
            let at_server = kept(&mut server, &reversed, second);
            assert!(at_client.len() <= 20 && at_server.len() <= 20);
            if second == 100 {
                // The first second is first-come: 20 each, mostly different.
                assert_eq!((at_client.len(), at_server.len()), (20, 20));
                continue;
            }
            assert!(client.shift() >= 3, "{}", client.shift());
            assert_eq!(client.shift(), server.shift());
            assert_eq!(at_client, at_server, "second {second}");
            assert!(!at_client.is_empty(), "second {second}");
        }
    }

    /// Within half the budget nothing narrows and every slice id is kept; slow requests have
    /// their own budget and need no slice; after a quiet gap the slice starts wide again.
    #[test]
    fn a_slice_within_budget_is_kept_whole_and_slow_requests_count_apart() {
        let ids = slice_ids(20_000, 10)[..10].to_vec();
        let mut budget = ExemplarBudget::default();
        for second in 1..4 {
            assert_eq!(kept(&mut budget, &ids, second).len(), 10);
            assert_eq!(budget.shift(), 0);
        }
        let many = slice_ids(20_000, 10);
        kept(&mut budget, &many, 4);
        kept(&mut budget, &many, 5);
        assert!(budget.shift() > 0);
        assert!(
            budget.admit(12_345, true, 5 * SECOND, 10, 20),
            "slow: own budget"
        );
        kept(&mut budget, &ids, 9);
        assert_eq!(budget.shift(), 0, "a gap starts wide");
        assert!(
            !ExemplarBudget::default().admit(1, true, SECOND, 10, 0),
            "budget 0: none"
        );
    }
}
