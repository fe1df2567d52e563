//! Node layout of the extent map: two cache-aligned node kinds and the primitive edits on them.
//!
//! Owns: the byte layout of leaves and internal nodes, key search within a node, and the moves of entries
//! between nodes (insert, remove, split, merge, redistribute). Must never: know about extents overlapping
//! or freed space (that is the tree's job), or leave a key slot past `count` holding anything but
//! `KEY_UNUSED` (the branch-free search counts on it).

use std::sync::Arc;

/// Entries per node, leaf or internal. 31 keys plus the count fill exactly four cache lines.
pub(super) const NODE_ENTRIES_MAX: usize = 31;
/// Fewest entries in a node other than the root. Below it a node is merged with or refilled from a
/// sibling. A third of the capacity (rather than half) leaves room so that an insert/remove pair at a
/// boundary does not split and merge the same nodes back and forth.
pub(super) const NODE_ENTRIES_MIN: usize = 10;
/// Key of an unused slot: greater than every real key (real keys are sector multiples), so that counting
/// the keys below a bound needs no comparison with `count`.
pub(super) const KEY_UNUSED: u64 = u64::MAX;
/// Stored location of a zero extent. Data locations are sector multiples, so this is never one of them.
pub(super) const LOCATION_ZERO: u64 = u64::MAX;

/// Where an extent's bytes live, and how many. Length and location are read together by every lookup, so
/// they share a cache line (16 bytes, four to a line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub(super) struct Span {
    pub length: u64,
    /// Byte address in the data area, or `LOCATION_ZERO`.
    pub location: u64,
}

const SPAN_UNUSED: Span = Span {
    length: 0,
    location: LOCATION_ZERO,
};

/// A leaf: up to 31 extents in offset order. 1024 bytes (16 cache lines):
/// - line 0-3: `offsets[31]` + `count` — everything a key search reads;
/// - line 4-11: `spans[31]` (length, location) — one line per lookup hit;
/// - line 12-15: `ops[31]` — read by catch-up scans and max-op upkeep, never by lookups.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub(super) struct Leaf {
    pub offsets: [u64; NODE_ENTRIES_MAX],
    pub count: usize,
    pub spans: [Span; NODE_ENTRIES_MAX],
    pub ops: [u64; NODE_ENTRIES_MAX],
}

/// An internal node: up to 31 children in offset order. 1024 bytes (16 cache lines):
/// - line 0-3: `keys[31]` (the smallest offset in each child's subtree) + `count`;
/// - line 4-11: `children[31]` (16 bytes each: kind + pointer) — one line per descent;
/// - line 12-15: `max_ops[31]`, the largest op in each child's subtree — read only by catch-up scans.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub(super) struct Internal {
    pub keys: [u64; NODE_ENTRIES_MAX],
    pub count: usize,
    pub children: [Option<Child>; NODE_ENTRIES_MAX],
    pub max_ops: [u64; NODE_ENTRIES_MAX],
}

/// A reference to a node. Shared between snapshots; copied on write (`Arc::make_mut`).
#[derive(Clone, Debug)]
pub(super) enum Child {
    Leaf(Arc<Leaf>),
    Internal(Arc<Internal>),
}

/// Asks the CPU to fetch `bytes` from `start` into its cache, one hint per cache line, and returns at
/// once (a no-op where no prefetch instruction is wired).
#[inline]
pub(super) fn prefetch_lines(start: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is only a hint: it never faults and never changes memory, whatever the
        // address, so no requirement on the pointer applies.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                start.wrapping_add(line).cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}

/// Number of keys strictly below `bound`. Branch-free over all 31 slots (unused slots hold `KEY_UNUSED`),
/// so the four key lines are loaded in parallel and the compiler can vectorise the compare.
#[inline]
pub(super) fn keys_below(keys: &[u64; NODE_ENTRIES_MAX], bound: u64) -> usize {
    keys.iter().map(|&key| usize::from(key < bound)).sum()
}

/// Number of keys at or below `bound` (`bound` is a real offset, never `KEY_UNUSED`).
#[inline]
pub(super) fn keys_at_or_below(keys: &[u64; NODE_ENTRIES_MAX], bound: u64) -> usize {
    debug_assert!(bound != KEY_UNUSED);
    keys.iter().map(|&key| usize::from(key <= bound)).sum()
}

/// Shifts `slots[at..count]` one place right (dropping the last slot's old value) and writes `value` at `at`.
fn insert_slot<T>(slots: &mut [T], count: usize, at: usize, value: T) {
    debug_assert!(at <= count && count < slots.len());
    slots[at..=count].rotate_right(1);
    slots[at] = value;
}

impl Leaf {
    pub fn empty() -> Self {
        Leaf {
            offsets: [KEY_UNUSED; NODE_ENTRIES_MAX],
            count: 0,
            spans: [SPAN_UNUSED; NODE_ENTRIES_MAX],
            ops: [0; NODE_ENTRIES_MAX],
        }
    }

    pub fn end(&self, index: usize) -> u64 {
        debug_assert!(index < self.count);
        self.offsets[index] + self.spans[index].length
    }

    pub fn max_op(&self) -> u64 {
        self.ops[..self.count].iter().copied().max().unwrap_or(0)
    }

    pub fn min_key(&self) -> u64 {
        self.offsets[0]
    }

    /// Inserts an entry at `at` into a leaf that has room.
    pub fn insert_at(&mut self, at: usize, offset: u64, span: Span, op: u64) {
        debug_assert!(self.count < NODE_ENTRIES_MAX);
        insert_slot(&mut self.offsets, self.count, at, offset);
        insert_slot(&mut self.spans, self.count, at, span);
        insert_slot(&mut self.ops, self.count, at, op);
        self.count += 1;
    }

    /// Removes entries `[from, to)`.
    pub fn remove_range(&mut self, from: usize, to: usize) {
        debug_assert!(from <= to && to <= self.count);
        let removed = to - from;
        if removed == 0 {
            return;
        }
        self.offsets[from..self.count].rotate_left(removed);
        self.spans[from..self.count].rotate_left(removed);
        self.ops[from..self.count].rotate_left(removed);
        let new_count = self.count - removed;
        self.offsets[new_count..self.count].fill(KEY_UNUSED);
        self.spans[new_count..self.count].fill(SPAN_UNUSED);
        self.ops[new_count..self.count].fill(0);
        self.count = new_count;
    }

    /// Moves entries `[from, count)` to the end of `into`.
    fn move_tail_to_end(&mut self, from: usize, into: &mut Leaf) {
        let moved = self.count - from;
        debug_assert!(into.count + moved <= NODE_ENTRIES_MAX);
        let at = into.count;
        into.offsets[at..at + moved].copy_from_slice(&self.offsets[from..self.count]);
        into.spans[at..at + moved].copy_from_slice(&self.spans[from..self.count]);
        into.ops[at..at + moved].copy_from_slice(&self.ops[from..self.count]);
        into.count += moved;
        self.remove_range(from, self.count);
    }

    /// Appends all entries of `right` (whose keys all follow ours).
    pub fn append(&mut self, right: &Leaf) {
        debug_assert!(self.count + right.count <= NODE_ENTRIES_MAX);
        debug_assert!(
            self.count == 0 || right.count == 0 || self.end(self.count - 1) <= right.offsets[0]
        );
        let at = self.count;
        let moved = right.count;
        self.offsets[at..at + moved].copy_from_slice(&right.offsets[..moved]);
        self.spans[at..at + moved].copy_from_slice(&right.spans[..moved]);
        self.ops[at..at + moved].copy_from_slice(&right.ops[..moved]);
        self.count += moved;
    }

    /// Splits off the entries from `at` into a new right sibling.
    pub fn split_off(&mut self, at: usize) -> Leaf {
        let mut right = Leaf::empty();
        self.move_tail_to_end(at, &mut right);
        right
    }

    /// Evens out the entries of two adjacent leaves (left has the smaller keys).
    pub fn redistribute(left: &mut Leaf, right: &mut Leaf) {
        let total = left.count + right.count;
        let left_target = total / 2;
        if left.count > left_target {
            // Move left's tail to the front of right.
            let mut moved = left.split_off(left_target);
            moved.append(right);
            *right = moved;
        } else {
            let take = left_target - left.count;
            let mut rest = right.split_off(take);
            left.append(right);
            std::mem::swap(right, &mut rest);
        }
    }
}

impl Internal {
    pub fn empty() -> Self {
        Internal {
            keys: [KEY_UNUSED; NODE_ENTRIES_MAX],
            count: 0,
            children: [const { None }; NODE_ENTRIES_MAX],
            max_ops: [0; NODE_ENTRIES_MAX],
        }
    }

    pub fn child(&self, index: usize) -> &Child {
        debug_assert!(index < self.count);
        match &self.children[index] {
            Some(child) => child,
            None => unreachable!("internal node slot {index} < count {} is empty", self.count),
        }
    }

    pub fn child_mut(&mut self, index: usize) -> &mut Child {
        debug_assert!(index < self.count);
        match &mut self.children[index] {
            Some(child) => child,
            None => unreachable!("internal node slot {index} is empty"),
        }
    }

    pub fn max_op(&self) -> u64 {
        self.max_ops[..self.count]
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    pub fn min_key(&self) -> u64 {
        self.keys[0]
    }

    /// Re-reads the key and max op of child `index` after the child changed.
    pub fn refresh(&mut self, index: usize) {
        let child = self.child(index);
        let (key, max_op) = (child.min_key(), child.max_op());
        self.keys[index] = key;
        self.max_ops[index] = max_op;
    }

    /// Inserts `child` at `at` into a node that has room.
    pub fn insert_at(&mut self, at: usize, child: Child) {
        debug_assert!(self.count < NODE_ENTRIES_MAX);
        let (key, max_op) = (child.min_key(), child.max_op());
        insert_slot(&mut self.keys, self.count, at, key);
        insert_slot(&mut self.children, self.count, at, Some(child));
        insert_slot(&mut self.max_ops, self.count, at, max_op);
        self.count += 1;
    }

    /// Removes (and drops) children `[from, to)`.
    pub fn remove_range(&mut self, from: usize, to: usize) {
        debug_assert!(from <= to && to <= self.count);
        let removed = to - from;
        if removed == 0 {
            return;
        }
        self.keys[from..self.count].rotate_left(removed);
        self.children[from..self.count].rotate_left(removed);
        self.max_ops[from..self.count].rotate_left(removed);
        let new_count = self.count - removed;
        self.keys[new_count..self.count].fill(KEY_UNUSED);
        self.children[new_count..self.count].fill(None);
        self.max_ops[new_count..self.count].fill(0);
        self.count = new_count;
    }

    /// Appends all children of `right` (whose keys all follow ours).
    pub fn append(&mut self, right: &Internal) {
        debug_assert!(self.count + right.count <= NODE_ENTRIES_MAX);
        let at = self.count;
        let moved = right.count;
        self.keys[at..at + moved].copy_from_slice(&right.keys[..moved]);
        self.children[at..at + moved].clone_from_slice(&right.children[..moved]);
        self.max_ops[at..at + moved].copy_from_slice(&right.max_ops[..moved]);
        self.count += moved;
    }

    /// Splits off the children from `at` into a new right sibling.
    pub fn split_off(&mut self, at: usize) -> Internal {
        let mut right = Internal::empty();
        let moved = self.count - at;
        right.keys[..moved].copy_from_slice(&self.keys[at..self.count]);
        for (slot, child) in right.children[..moved]
            .iter_mut()
            .zip(&mut self.children[at..self.count])
        {
            *slot = child.take();
        }
        right.max_ops[..moved].copy_from_slice(&self.max_ops[at..self.count]);
        right.count = moved;
        self.keys[at..self.count].fill(KEY_UNUSED);
        self.max_ops[at..self.count].fill(0);
        self.count = at;
        right
    }

    /// Evens out the children of two adjacent nodes (left has the smaller keys). Returns the index, in
    /// the node that received children, where the received ones meet its own: (true, i) for left, (false,
    /// i) for right.
    pub fn redistribute(left: &mut Internal, right: &mut Internal) -> (bool, usize) {
        let total = left.count + right.count;
        let left_target = total / 2;
        if left.count > left_target {
            let mut moved = left.split_off(left_target);
            let junction = moved.count;
            moved.append(right);
            *right = moved;
            (false, junction)
        } else {
            let junction = left.count;
            let take = left_target - left.count;
            let mut rest = right.split_off(take);
            left.append(right);
            std::mem::swap(right, &mut rest);
            (true, junction)
        }
    }
}

impl Child {
    pub fn count(&self) -> usize {
        match self {
            Child::Leaf(leaf) => leaf.count,
            Child::Internal(node) => node.count,
        }
    }

    /// Smallest offset in the subtree (`KEY_UNUSED` when empty).
    pub fn min_key(&self) -> u64 {
        match self {
            Child::Leaf(leaf) => leaf.min_key(),
            Child::Internal(node) => node.min_key(),
        }
    }

    /// Largest op in the subtree (0 when empty).
    pub fn max_op(&self) -> u64 {
        match self {
            Child::Leaf(leaf) => leaf.max_op(),
            Child::Internal(node) => node.max_op(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};

    use super::*;

    const CACHE_LINE_BYTES: usize = 64;

    #[test]
    fn nodes_are_whole_cache_lines() {
        assert_eq!(align_of::<Leaf>() % CACHE_LINE_BYTES, 0);
        assert_eq!(size_of::<Leaf>() % CACHE_LINE_BYTES, 0);
        assert_eq!(align_of::<Internal>() % CACHE_LINE_BYTES, 0);
        assert_eq!(size_of::<Internal>() % CACHE_LINE_BYTES, 0);
        // The sizes the module documentation promises.
        assert_eq!(size_of::<Leaf>(), 16 * CACHE_LINE_BYTES);
        assert_eq!(size_of::<Internal>(), 16 * CACHE_LINE_BYTES);
        assert_eq!(size_of::<Option<Child>>(), 16);
        // Keys and count share the first four lines; the next array starts on a line boundary.
        assert_eq!(offset_of!(Leaf, count), 31 * 8);
        assert_eq!(offset_of!(Leaf, spans), 4 * CACHE_LINE_BYTES);
        assert_eq!(offset_of!(Internal, count), 31 * 8);
        assert_eq!(offset_of!(Internal, children), 4 * CACHE_LINE_BYTES);
        assert_eq!(offset_of!(Internal, max_ops) % 8, 0);
    }

    #[test]
    fn key_search_ignores_unused_slots() {
        let mut keys = [KEY_UNUSED; NODE_ENTRIES_MAX];
        keys[..3].copy_from_slice(&[512, 1024, 4096]);
        assert_eq!(keys_below(&keys, 0), 0);
        assert_eq!(keys_below(&keys, 1024), 1);
        assert_eq!(keys_at_or_below(&keys, 1024), 2);
        assert_eq!(keys_at_or_below(&keys, 1 << 40), 3);
    }

    #[test]
    fn leaf_redistribute_keeps_order() {
        let mut left = Leaf::empty();
        let mut right = Leaf::empty();
        for i in 0..20u64 {
            let span = Span {
                length: 512,
                location: i * 512,
            };
            if i < 3 {
                left.insert_at(left.count, i * 512, span, i + 1);
            } else {
                right.insert_at(right.count, i * 512, span, i + 1);
            }
        }
        Leaf::redistribute(&mut left, &mut right);
        assert_eq!((left.count, right.count), (10, 10));
        let all: Vec<u64> = left.offsets[..left.count]
            .iter()
            .chain(&right.offsets[..right.count])
            .copied()
            .collect();
        assert_eq!(all, (0..20).map(|i| i * 512).collect::<Vec<_>>());
        assert!(left.offsets[left.count..].iter().all(|&k| k == KEY_UNUSED));
        assert!(
            right.offsets[right.count..]
                .iter()
                .all(|&k| k == KEY_UNUSED)
        );
    }
}
