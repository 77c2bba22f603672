//! One family of per-second aggregates. While a second can still receive facts it is a hash
//! map; once it is old enough it is frozen into a sorted boxed slice, which costs only the rows
//! themselves (no spare hash-table capacity) for the rest of its life in the history.

use std::hash::Hash;

use foldhash::{HashMap, HashMapExt};

use super::interner::LabelId;

/// A key made of label ids that can be folded into coarser keys when a second is full.
pub(crate) trait RowKey: Copy + Eq + Hash + Ord {
    /// Every label id in the key (for reclaiming unused ids).
    fn label_ids(&self, mark: &mut dyn FnMut(LabelId));
    /// The same key with its high-cardinality labels (process, server, command) replaced by
    /// OTHER, so a flood of distinct labels still counts somewhere.
    fn folded(&self) -> Self;
}

/// A per-row value: most are counters; histograms and sample lists compact when frozen.
pub(crate) trait RowValue: Default {
    fn freeze(&mut self) {}
    fn thaw(&mut self) {}
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl RowValue for u32 {}

#[derive(Debug)]
pub(crate) enum Series<K, V> {
    Open(HashMap<K, V>),
    Frozen(Box<[(K, V)]>),
}

impl<K, V> Default for Series<K, V> {
    fn default() -> Self {
        Series::Frozen(Box::new([]))
    }
}

/// How many rows a second may still take. Folded rows get a small reserve beyond the cap so
/// the counts of a label flood are kept (under "other") rather than dropped.
#[derive(Debug)]
pub(crate) struct RowBudget<'a> {
    pub used: &'a mut u32,
    pub cap: u32,
    pub reserve: u32,
}

impl<K: RowKey, V: RowValue> Series<K, V> {
    fn open(&mut self) -> &mut HashMap<K, V> {
        if let Series::Frozen(rows) = self {
            let rows = std::mem::take(rows);
            let mut map = HashMap::with_capacity(rows.len());
            for (key, mut value) in rows.into_vec() {
                value.thaw();
                map.insert(key, value);
            }
            *self = Series::Open(map);
        }
        match self {
            Series::Open(map) => map,
            Series::Frozen(_) => unreachable!("thawed just above"),
        }
    }

    /// The row for `key`, created if the budget allows, else the folded row, else None (the
    /// caller counts an overflow).
    pub(crate) fn row(&mut self, key: K, budget: RowBudget<'_>) -> Option<&mut V> {
        let map = self.open();
        let key = if map.contains_key(&key) || *budget.used < budget.cap {
            key
        } else {
            let folded = key.folded();
            if !map.contains_key(&folded) && *budget.used >= budget.cap + budget.reserve {
                return None;
            }
            folded
        };
        if !map.contains_key(&key) {
            *budget.used += 1;
        }
        Some(map.entry(key).or_default())
    }

    pub(crate) fn freeze(&mut self) {
        if let Series::Open(map) = self {
            let mut rows: Vec<(K, V)> = std::mem::take(map).into_iter().collect();
            rows.sort_unstable_by_key(|(key, _)| *key);
            for (_, value) in rows.iter_mut() {
                value.freeze();
            }
            *self = Series::Frozen(rows.into_boxed_slice());
        }
    }

    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (&K, &V)> + '_> {
        match self {
            Series::Open(map) => Box::new(map.iter()),
            Series::Frozen(rows) => Box::new(rows.iter().map(|(k, v)| (k, v))),
        }
    }

    pub(crate) fn mark_labels(&self, mark: &mut dyn FnMut(LabelId)) {
        for (key, _) in self.iter() {
            key.label_ids(mark);
        }
    }

    /// Heap bytes, counting a hash map's whole table (entries plus one control byte each).
    pub(crate) fn heap_bytes(&self) -> usize {
        let row = std::mem::size_of::<(K, V)>();
        match self {
            Series::Open(map) => {
                // hashbrown keeps 1/8 of its table free and one control byte per slot.
                let slots = if map.capacity() == 0 {
                    0
                } else {
                    map.capacity() * 8 / 7 + 1
                };
                slots * (row + 1) + map.values().map(V::heap_bytes).sum::<usize>()
            }
            Series::Frozen(rows) => {
                rows.len() * row + rows.iter().map(|(_, v)| v.heap_bytes()).sum::<usize>()
            }
        }
    }
}
