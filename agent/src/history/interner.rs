//! Interned label strings. Buckets store 2-byte ids instead of strings, which is most of what
//! keeps a second of history small. The table is bounded: when it is full, ids no bucket still
//! uses are reclaimed, and if that frees nothing new strings fold into [`OTHER`].

use foldhash::{HashMap, HashMapExt};

pub type LabelId = u16;

/// The empty label: "not known" (e.g. a process that was not seen).
pub const UNKNOWN: LabelId = 0;
/// Where labels go once the table is full.
pub const OTHER: LabelId = 1;
pub const OTHER_LABEL: &str = "other";

/// Longest label kept, in bytes; longer ones are cut at a character boundary.
pub const MAX_LABEL_BYTES: usize = 128;

#[derive(Debug)]
pub struct Interner {
    strings: Vec<Option<Box<str>>>,
    ids: HashMap<Box<str>, LabelId>,
    free: Vec<LabelId>,
    capacity: usize,
    /// Strings that could not get an id and were folded into OTHER.
    pub folded: u64,
}

impl Interner {
    /// `capacity` counts the two reserved labels; it is clamped to 2..=65536.
    pub fn new(capacity: usize) -> Interner {
        let capacity = capacity.clamp(2, LabelId::MAX as usize + 1);
        let mut interner = Interner {
            strings: Vec::new(),
            ids: HashMap::new(),
            free: Vec::new(),
            capacity,
            folded: 0,
        };
        interner.strings.push(Some("".into()));
        interner.strings.push(Some(OTHER_LABEL.into()));
        interner.ids.insert("".into(), UNKNOWN);
        interner.ids.insert(OTHER_LABEL.into(), OTHER);
        interner
    }

    /// The id of `label` if it is already interned.
    pub fn get(&self, label: &str) -> Option<LabelId> {
        self.ids.get(truncate(label)).copied()
    }

    /// The id for `label`, adding it if there is room. `None` means the table is full: the
    /// caller may reclaim unused ids ([`Interner::retain`]) and try again, or use OTHER.
    pub fn try_intern(&mut self, label: &str) -> Option<LabelId> {
        let label = truncate(label);
        if let Some(&id) = self.ids.get(label) {
            return Some(id);
        }
        let id = if let Some(id) = self.free.pop() {
            self.strings[id as usize] = Some(label.into());
            id
        } else if self.strings.len() < self.capacity {
            self.strings.push(Some(label.into()));
            (self.strings.len() - 1) as LabelId
        } else {
            return None;
        };
        self.ids.insert(label.into(), id);
        Some(id)
    }

    pub fn resolve(&self, id: LabelId) -> &str {
        self.strings
            .get(id as usize)
            .and_then(|s| s.as_deref())
            .unwrap_or(OTHER_LABEL)
    }

    /// Frees every id for which `in_use` is false (the reserved ones are always kept).
    pub fn retain(&mut self, in_use: &[bool]) {
        for id in 2..self.strings.len() {
            if in_use.get(id).copied().unwrap_or(false) {
                continue;
            }
            if let Some(label) = self.strings[id].take() {
                self.ids.remove(&label);
                self.free.push(id as LabelId);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn slots(&self) -> usize {
        self.strings.len()
    }

    /// Heap bytes: each label is stored twice (table and index) plus map and vector overhead.
    pub fn heap_bytes(&self) -> usize {
        let text: usize = self.strings.iter().flatten().map(|s| s.len()).sum();
        2 * text
            + self.strings.capacity() * std::mem::size_of::<Option<Box<str>>>()
            + self.ids.capacity() * (std::mem::size_of::<(Box<str>, LabelId)>() + 1)
            + self.free.capacity() * std::mem::size_of::<LabelId>()
    }
}

fn truncate(label: &str) -> &str {
    if label.len() <= MAX_LABEL_BYTES {
        return label;
    }
    let mut end = MAX_LABEL_BYTES;
    while !label.is_char_boundary(end) {
        end -= 1;
    }
    &label[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_reuses_and_reclaims() {
        let mut interner = Interner::new(4);
        let a = interner.try_intern("a").unwrap();
        let b = interner.try_intern("b").unwrap();
        assert_eq!(interner.try_intern("a"), Some(a));
        assert_eq!(interner.try_intern("c"), None);
        let mut in_use = vec![false; interner.slots()];
        in_use[b as usize] = true;
        interner.retain(&in_use);
        assert_eq!(interner.get("a"), None);
        let c = interner.try_intern("c").unwrap();
        assert_eq!(c, a, "the freed id is reused");
        assert_eq!(interner.resolve(c), "c");
        assert_eq!(interner.resolve(b), "b");
        assert_eq!(interner.resolve(OTHER), "other");
    }

    #[test]
    fn long_labels_are_cut_at_a_char_boundary() {
        let mut interner = Interner::new(8);
        let long = "é".repeat(200);
        let id = interner.try_intern(&long).unwrap();
        assert!(interner.resolve(id).len() <= MAX_LABEL_BYTES);
        assert_eq!(interner.try_intern(&long), Some(id));
    }
}
