//! Edits of the extent map: cutting a range out of the older extents, inserting an entry, and keeping the
//! tree balanced while doing so.
//!
//! Owns: the structural invariants of the tree (all leaves at one depth; every node but the root holds
//! at least `NODE_ENTRIES_MIN` entries; an internal root holds at least two; every internal key and max op
//! equals its child's smallest offset and largest op). Must never: mutate a node without
//! `Arc::make_mut` (a snapshot may share it), or drop a data range without reporting it as freed.
//!
//! Removing a range `[start, end)` touches, at each level, at most two children: the one holding the
//! extent just before `start` and the one holding the last extent before `end`. Every child between them is
//! wholly covered and dropped as a whole (its data reported freed). Only those two boundary children can
//! end up underfull; they are merged with or refilled from a neighbour on the way back up. A merge can
//! bring an underfull grandchild next to new siblings (a child left with a single, underfull child); the
//! grandchild always sits where the two merged nodes meet, so the fix-up descends along that seam only.

use std::sync::Arc;

use super::ExtentMap;
use super::node::{
    Child, Internal, LOCATION_ZERO, Leaf, NODE_ENTRIES_MAX, NODE_ENTRIES_MIN, Span, keys_below,
};
use crate::alloc::Piece;

/// An entry to (re)insert: the tail of an extent that a smaller, newer extent landed inside.
#[derive(Clone, Copy, Debug)]
pub(super) struct Entry {
    pub offset: u64,
    pub span: Span,
    pub op: u64,
}

/// One range removal in progress.
struct Removal<'a> {
    start: u64,
    end: u64,
    /// Op of the extent being inserted: nothing it overlaps may be newer.
    op: u64,
    freed: &'a mut Vec<Piece>,
    extents_removed: usize,
    /// Set when one extent covered all of `[start, end)` and beyond: its part after `end`.
    remainder: Option<Entry>,
}

impl Removal<'_> {
    /// Reports `length` bytes, `skip` bytes into the extent stored at `stored_location`, as freed.
    fn free(&mut self, stored_location: u64, skip: u64, length: u64) {
        debug_assert!(length > 0);
        if stored_location != LOCATION_ZERO {
            self.freed.push(Piece {
                address: stored_location + skip,
                length,
            });
        }
    }
}

/// Where to split a full node that receives an entry at `at`. An append at the end (sequential writes)
/// leaves the left node nearly full, since nothing will be inserted into it again; otherwise halves.
fn split_point(at: usize) -> usize {
    if at == NODE_ENTRIES_MAX {
        NODE_ENTRIES_MAX + 1 - NODE_ENTRIES_MIN
    } else {
        NODE_ENTRIES_MAX.div_ceil(2)
    }
}

impl ExtentMap {
    /// Cuts `[start, end)` out of the extents in the map, reporting freed data. Returns the part after
    /// `end` of an extent that covered the whole range and more, which the caller inserts back.
    pub(super) fn remove_range(
        &mut self,
        start: u64,
        end: u64,
        op: u64,
        freed: &mut Vec<Piece>,
    ) -> Option<Entry> {
        let mut removal = Removal {
            start,
            end,
            op,
            freed,
            extents_removed: 0,
            remainder: None,
        };
        remove_in(&mut self.root, &mut removal);
        debug_assert!(removal.extents_removed <= self.extent_count);
        self.extent_count -= removal.extents_removed;
        self.shrink_root();
        removal.remainder
    }

    /// Inserts one entry into space that no extent overlaps.
    pub(super) fn insert_entry(&mut self, offset: u64, span: Span, op: u64) {
        if let Some(right) = insert_in(&mut self.root, offset, span, op) {
            let left = std::mem::replace(&mut self.root, Child::Leaf(Arc::new(Leaf::empty())));
            let mut root = Internal::empty();
            root.insert_at(0, left);
            root.insert_at(1, right);
            self.root = Child::Internal(Arc::new(root));
            self.height += 1;
        }
        self.extent_count += 1;
    }

    /// Replaces an internal root with fewer than two children by its only child (or an empty leaf).
    fn shrink_root(&mut self) {
        while let Child::Internal(root) = &self.root {
            match root.count {
                0 => {
                    self.root = Child::Leaf(Arc::new(Leaf::empty()));
                    self.height = 0;
                }
                1 => {
                    self.root = root.child(0).clone();
                    self.height -= 1;
                }
                _ => return,
            }
        }
    }
}

fn remove_in(node: &mut Child, removal: &mut Removal) {
    match node {
        Child::Leaf(leaf) => remove_in_leaf(Arc::make_mut(leaf), removal),
        Child::Internal(internal) => remove_in_internal(Arc::make_mut(internal), removal),
    }
}

fn remove_in_leaf(leaf: &mut Leaf, removal: &mut Removal) {
    let (start, end) = (removal.start, removal.end);
    let first = keys_below(&leaf.offsets, start);

    // The extent starting before `start` may reach into the range.
    if first > 0 {
        let before = first - 1;
        let before_start = leaf.offsets[before];
        let before_end = leaf.end(before);
        let location = leaf.spans[before].location;
        debug_assert!(
            before_end <= start || leaf.ops[before] <= removal.op,
            "insert older than what it overlaps"
        );
        if before_end > end {
            // The new extent lands strictly inside this one: keep its head here, hand its tail back.
            removal.free(location, start - before_start, end - start);
            leaf.spans[before].length = start - before_start;
            removal.remainder = Some(Entry {
                offset: end,
                span: Span {
                    length: before_end - end,
                    location: super::advance(location, end - before_start),
                },
                op: leaf.ops[before],
            });
            return;
        }
        if before_end > start {
            removal.free(location, start - before_start, before_end - start);
            leaf.spans[before].length = start - before_start;
        }
    }

    // Extents starting inside the range: all covered, except perhaps the last, which may stick out.
    let after = keys_below(&leaf.offsets, end);
    let mut removed_to = after;
    for index in first..after {
        let extent_start = leaf.offsets[index];
        let extent_end = leaf.end(index);
        let location = leaf.spans[index].location;
        debug_assert!(
            leaf.ops[index] <= removal.op,
            "insert older than what it overlaps"
        );
        if extent_end <= end {
            removal.free(location, 0, extent_end - extent_start);
        } else {
            debug_assert_eq!(index, after - 1);
            removal.free(location, 0, end - extent_start);
            leaf.offsets[index] = end;
            leaf.spans[index] = Span {
                length: extent_end - end,
                location: super::advance(location, end - extent_start),
            };
            removed_to = index;
        }
    }
    leaf.remove_range(first, removed_to);
    removal.extents_removed += removed_to - first;
}

fn remove_in_internal(node: &mut Internal, removal: &mut Removal) {
    // The child holding the last extent before `start`, and the one holding the last extent before `end`.
    let first = keys_below(&node.keys, removal.start).saturating_sub(1);
    let last = keys_below(&node.keys, removal.end)
        .saturating_sub(1)
        .max(first);

    remove_in(node.child_mut(first), removal);
    let mut touched_end = first + 1;
    if last > first {
        for middle in first + 1..last {
            debug_assert!(
                node.max_ops[middle] <= removal.op,
                "insert older than what it overlaps"
            );
            free_subtree(node.child(middle), removal);
        }
        remove_in(node.child_mut(last), removal);
        node.remove_range(first + 1, last);
        touched_end = first + 2;
    }
    for index in (first..touched_end).rev() {
        if node.child(index).count() == 0 {
            node.remove_range(index, index + 1);
        } else {
            node.refresh(index);
        }
    }
    rebalance(node, first, first + 1);
}

/// Reports every data byte of a wholly covered subtree as freed.
fn free_subtree(node: &Child, removal: &mut Removal) {
    match node {
        Child::Leaf(leaf) => {
            for index in 0..leaf.count {
                removal.free(leaf.spans[index].location, 0, leaf.spans[index].length);
            }
            removal.extents_removed += leaf.count;
        }
        Child::Internal(internal) => {
            for index in 0..internal.count {
                free_subtree(internal.child(index), removal);
            }
        }
    }
}

/// Restores the minimum occupancy of `node`'s children, given that only children in `[low, high]` may be
/// below it (and that their own children are not, except along a merge seam, which `combine` fixes).
fn rebalance(node: &mut Internal, mut low: usize, mut high: usize) {
    loop {
        if node.count < 2 {
            // A lone child cannot be fixed here; the parent merges this node, and the seam fix-up reaches it.
            return;
        }
        high = high.min(node.count - 1);
        low = low.min(high);
        let Some(underfull) =
            (low..=high).find(|&index| node.child(index).count() < NODE_ENTRIES_MIN)
        else {
            return;
        };
        let left = if underfull + 1 < node.count {
            underfull
        } else {
            underfull - 1
        };
        low = low.min(left);
        combine(node, left);
    }
}

/// Merges children `left` and `left + 1` when they fit in one node, otherwise evens them out.
fn combine(node: &mut Internal, left: usize) {
    let (head, tail) = node.children.split_at_mut(left + 1);
    let (Some(left_child), Some(right_child)) = (&mut head[left], &mut tail[0]) else {
        unreachable!(
            "combine of children {left} and {} of {}",
            left + 1,
            node.count
        );
    };
    let merged = match (left_child, right_child) {
        (Child::Leaf(left_leaf), Child::Leaf(right_leaf)) => {
            if left_leaf.count + right_leaf.count <= NODE_ENTRIES_MAX {
                Arc::make_mut(left_leaf).append(right_leaf);
                true
            } else {
                Leaf::redistribute(Arc::make_mut(left_leaf), Arc::make_mut(right_leaf));
                false
            }
        }
        (Child::Internal(left_node), Child::Internal(right_node)) => {
            if left_node.count + right_node.count <= NODE_ENTRIES_MAX {
                let seam = left_node.count;
                let left_node = Arc::make_mut(left_node);
                left_node.append(right_node);
                rebalance(left_node, seam.saturating_sub(1), seam);
                true
            } else {
                let (left_node, right_node) = (Arc::make_mut(left_node), Arc::make_mut(right_node));
                let (received_left, seam) = Internal::redistribute(left_node, right_node);
                let receiver = if received_left { left_node } else { right_node };
                rebalance(receiver, seam.saturating_sub(1), seam);
                false
            }
        }
        _ => unreachable!("siblings at different heights"),
    };
    if merged {
        node.remove_range(left + 1, left + 2);
        node.refresh(left);
    } else {
        node.refresh(left);
        node.refresh(left + 1);
    }
}

/// Replaces the entry at `offset`, which has `span.length`, with `span` and `op`, reporting its data as
/// freed. The tree's shape does not change: only the path to the leaf is copied (if a snapshot shares
/// it) and the max ops along it raised.
pub(super) fn replace_in(
    node: &mut Child,
    offset: u64,
    span: Span,
    op: u64,
    freed: &mut Vec<Piece>,
) {
    match node {
        Child::Leaf(leaf) => {
            let leaf = Arc::make_mut(leaf);
            let at = keys_below(&leaf.offsets, offset + 1) - 1;
            assert!(
                leaf.offsets[at] == offset && leaf.spans[at].length == span.length,
                "replace of {offset}+{} found another extent",
                span.length
            );
            debug_assert!(leaf.ops[at] <= op, "insert older than what it overlaps");
            let old = leaf.spans[at].location;
            if old != LOCATION_ZERO {
                freed.push(Piece {
                    address: old,
                    length: span.length,
                });
            }
            leaf.spans[at] = span;
            leaf.ops[at] = op;
        }
        Child::Internal(internal) => {
            let internal = Arc::make_mut(internal);
            let index = keys_below(&internal.keys, offset + 1) - 1;
            replace_in(internal.child_mut(index), offset, span, op, freed);
            internal.max_ops[index] = internal.max_ops[index].max(op);
        }
    }
}

/// Inserts an entry below `node`; returns the new right sibling when `node` had to split.
fn insert_in(node: &mut Child, offset: u64, span: Span, op: u64) -> Option<Child> {
    match node {
        Child::Leaf(leaf) => {
            let leaf = Arc::make_mut(leaf);
            let at = keys_below(&leaf.offsets, offset);
            debug_assert!(
                at == 0 || leaf.end(at - 1) <= offset,
                "insert over an extent"
            );
            debug_assert!(at == leaf.count || leaf.offsets[at] >= offset + span.length);
            if leaf.count < NODE_ENTRIES_MAX {
                leaf.insert_at(at, offset, span, op);
                return None;
            }
            let split_at = split_point(at);
            let mut right = leaf.split_off(split_at);
            if at < split_at {
                leaf.insert_at(at, offset, span, op);
            } else {
                right.insert_at(at - split_at, offset, span, op);
            }
            Some(Child::Leaf(Arc::new(right)))
        }
        Child::Internal(internal) => {
            let internal = Arc::make_mut(internal);
            let index = keys_below(&internal.keys, offset).saturating_sub(1);
            let split = insert_in(internal.child_mut(index), offset, span, op);
            let Some(right) = split else {
                internal.keys[index] = internal.keys[index].min(offset);
                internal.max_ops[index] = internal.max_ops[index].max(op);
                return None;
            };
            internal.refresh(index);
            let at = index + 1;
            if internal.count < NODE_ENTRIES_MAX {
                internal.insert_at(at, right);
                return None;
            }
            let split_at = split_point(at);
            let mut new_right = internal.split_off(split_at);
            if at < split_at {
                internal.insert_at(at, right);
            } else {
                new_right.insert_at(at - split_at, right);
            }
            Some(Child::Internal(Arc::new(new_right)))
        }
    }
}

#[cfg(test)]
impl ExtentMap {
    /// Checks every structural invariant by walking the whole tree (tests only).
    pub(super) fn check_invariants(&self) {
        let extents = check_node(&self.root, self.height, true);
        assert_eq!(extents, self.extent_count);
        let mut previous_end = 0;
        let mut count = 0;
        for extent in self.iter() {
            assert!(extent.length > 0);
            assert!(
                extent.offset >= previous_end,
                "{extent:?} overlaps its predecessor"
            );
            previous_end = extent.end();
            count += 1;
        }
        assert_eq!(count, self.extent_count);
    }

    pub(super) fn height(&self) -> usize {
        self.height
    }
}

#[cfg(test)]
fn check_node(node: &Child, height: usize, is_root: bool) -> usize {
    use super::node::KEY_UNUSED;
    let count = node.count();
    assert!(count <= NODE_ENTRIES_MAX);
    match node {
        Child::Leaf(leaf) => {
            assert_eq!(height, 0, "leaves at different depths");
            assert!(
                is_root || count >= NODE_ENTRIES_MIN,
                "underfull leaf ({count})"
            );
            for index in 1..count {
                assert!(leaf.end(index - 1) <= leaf.offsets[index]);
            }
            assert!(leaf.offsets[count..].iter().all(|&key| key == KEY_UNUSED));
            count
        }
        Child::Internal(internal) => {
            assert!(height > 0, "internal node at leaf depth");
            let count_min = if is_root { 2 } else { NODE_ENTRIES_MIN };
            assert!(count >= count_min, "underfull internal node ({count})");
            assert!(internal.keys[count..].iter().all(|&key| key == KEY_UNUSED));
            assert!(internal.children[count..].iter().all(Option::is_none));
            let mut extents = 0;
            for index in 0..count {
                let child = internal.child(index);
                assert_eq!(internal.keys[index], child.min_key(), "stale key");
                assert_eq!(internal.max_ops[index], child.max_op(), "stale max op");
                if index > 0 {
                    assert!(internal.keys[index - 1] < internal.keys[index]);
                }
                extents += check_node(child, height - 1, false);
            }
            extents
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECTOR: u64 = 512;

    /// A leaf of `count` one-sector extents starting at sector `first`, two sectors apart.
    fn leaf(first: u64, count: u64) -> Child {
        let mut leaf = Leaf::empty();
        for index in 0..count {
            let offset = (first + index * 2) * SECTOR;
            let span = Span {
                length: SECTOR,
                location: offset,
            };
            leaf.insert_at(leaf.count, offset, span, first + index + 1);
        }
        Child::Leaf(Arc::new(leaf))
    }

    fn internal(children: Vec<Child>) -> Child {
        let mut node = Internal::empty();
        for child in children {
            node.insert_at(node.count, child);
        }
        Child::Internal(Arc::new(node))
    }

    /// A node left with a single underfull child, next to a full sibling: the two are evened out rather
    /// than merged, and the lone grandchild must then be fixed where it landed.
    fn lone_child_next_to_full_sibling(lone_first: bool) {
        let lone = |first| internal(vec![leaf(first, 3)]);
        let full = |first| {
            internal(
                (0..NODE_ENTRIES_MAX as u64)
                    .map(|index| leaf(first + index * 100, 10))
                    .collect(),
            )
        };
        let (left, right) = if lone_first {
            (lone(0), full(1000))
        } else {
            (full(0), lone(100_000))
        };
        let Child::Internal(mut root) = internal(vec![left, right]) else {
            unreachable!()
        };
        rebalance(Arc::make_mut(&mut root), 0, 1);
        let map = ExtentMap {
            root: Child::Internal(root),
            height: 2,
            extent_count: 3 + 10 * NODE_ENTRIES_MAX,
        };
        map.check_invariants();
    }

    #[test]
    fn redistribute_fixes_a_lone_grandchild_on_the_left() {
        lone_child_next_to_full_sibling(true);
    }

    #[test]
    fn redistribute_fixes_a_lone_grandchild_on_the_right() {
        lone_child_next_to_full_sibling(false);
    }
}
