//! The keys of a connection's outstanding requests, in request order, in one byte arena.

use std::collections::VecDeque;

use super::super::model::{key_could_be, Status, ValueHead};
use super::Pending;

/// A key of an outstanding request; its bytes live in [`KeyStore::bytes`].
#[derive(Debug, Clone, Copy)]
pub(super) struct KeySlot {
    pub(super) start: usize,
    pub(super) len: u8,
    pub(super) truncated: bool,
    pub(super) status: Option<Status>,
    pub(super) resp_bytes: u64,
    pub(super) value_len: Option<u32>,
    pub(super) value_head: Option<ValueHead>,
}

/// Keys of outstanding requests, in request order. Small slots point into one byte arena so
/// the hot path moves a few bytes per key instead of whole fixed-size key buffers. Requests
/// finish from the front, so dead bytes accumulate at the arena's start: it is cleared when
/// no key is outstanding and compacted when dead bytes outnumber live ones, which bounds it
/// to twice the live keys.
#[derive(Debug, Default)]
pub(super) struct KeyStore {
    pub(super) slots: VecDeque<KeySlot>,
    bytes: Vec<u8>,
}

const ARENA_COMPACT_MIN: usize = 16 * 1024;

impl KeyStore {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn push(&mut self, key: &[u8], truncated: bool) {
        self.slots.push_back(KeySlot {
            start: self.bytes.len(),
            len: key.len().min(usize::from(u8::MAX)) as u8,
            truncated,
            status: None,
            resp_bytes: 0,
            value_len: None,
            value_head: None,
        });
        self.bytes
            .extend_from_slice(&key[..key.len().min(usize::from(u8::MAX))]);
    }

    pub(super) fn bytes_of(&self, slot: &KeySlot) -> &[u8] {
        self.bytes
            .get(slot.start..slot.start + usize::from(slot.len))
            .unwrap_or_default()
    }

    /// Whether the key at `index` is unanswered (when `unanswered_only`) and could be `other`.
    pub(super) fn could_be(
        &self,
        index: usize,
        other: &[u8],
        other_truncated: bool,
        unanswered_only: bool,
    ) -> bool {
        self.slots.get(index).is_some_and(|slot| {
            (!unanswered_only || slot.status.is_none())
                && key_could_be(self.bytes_of(slot), slot.truncated, other, other_truncated)
        })
    }

    /// Drops the last slots so that `keep` remain.
    pub(super) fn truncate(&mut self, keep: usize) {
        if let Some(first_dropped) = self.slots.get(keep) {
            self.bytes.truncate(first_dropped.start);
        }
        self.slots.truncate(keep);
        self.reclaim();
    }

    pub(super) fn reclaim(&mut self) {
        match self.slots.front() {
            None => self.bytes.clear(),
            Some(front)
                if self.bytes.len() >= ARENA_COMPACT_MIN && front.start > self.bytes.len() / 2 =>
            {
                let dead = front.start;
                self.bytes.drain(..dead);
                for slot in &mut self.slots {
                    slot.start -= dead;
                }
            }
            Some(_) => {}
        }
    }
}

/// The key (index among the entry's keys) a VALUE item for `key` answers: the first key not
/// yet answered that could be `key`, looking from the entry's cursor first because servers
/// answer in request order. Queue servers may echo the queue name with or without Kestrel
/// options, so the part of the key before the first '/' is tried too.
pub(super) fn value_slot(
    slots: &KeyStore,
    entry: &Pending,
    offset: usize,
    key: &[u8],
    key_truncated: bool,
) -> Option<usize> {
    let n = usize::from(entry.nkeys);
    let cursor = usize::from(entry.cursor).min(n);
    let queue_name = key
        .iter()
        .position(|&b| b == b'/')
        .map(|slash| &key[..slash]);
    for candidate in [Some(key), queue_name].into_iter().flatten() {
        let truncated = key_truncated && candidate.len() == key.len();
        if let Some(i) = (cursor..n)
            .chain(0..cursor)
            .find(|&i| slots.could_be(offset + i, candidate, truncated, true))
        {
            return Some(i);
        }
    }
    None
}
