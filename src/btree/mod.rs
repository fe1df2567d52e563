//! The extent map: which bytes of the volume live where in this peer's data area, and by which op.
//!
//! Owns: the committed extents of one volume copy, as a copy-on-write B+tree keyed by volume offset, and
//! point-in-time snapshots of it. Must never: hold two overlapping extents, merge adjacent extents (they
//! carry different ops), lose track of a data byte (every byte an insert stops referencing is reported
//! to the caller in `freed`, exactly once), or do IO. It is not durable by itself: the journal and
//! checkpoints are.
//!
//! All offsets, lengths and locations are bytes, multiples of the sector size (512).
//!
//! # Layout (see `node`)
//! Leaves and internal nodes are both `#[repr(C, align(64))]`, 1024 bytes (16 cache lines), at most 31
//! entries (at least 10 except at the root):
//! - leaf: `offsets[31]` + count (lines 0-3), `spans[31]` = (length, location) (lines 4-11), `ops[31]`
//!   (lines 12-15);
//! - internal: `keys[31]` = smallest offset of each child + count (lines 0-3), `children[31]` (lines
//!   4-11), `max_ops[31]` = largest op in each child's subtree (lines 12-15).
//!
//! Keys are a contiguous array searched branch-free over all 31 slots (unused slots hold `u64::MAX`), so
//! the four key lines of a node are fetched in parallel: a descent costs about two dependent cache misses
//! per level (keys, then the child pointer or the span). With random inserts nodes are about 70% full
//! (fan-out ~21): 1M random 4 KiB writes make 5 levels (1 root, 5, 100, 2.1K internal nodes, 46K
//! leaves). The top three levels (~106 KiB) stay in L2, leaving about 4 misses to memory per cold point
//! lookup. Lookups and inserts never read `ops`/`max_ops`; catch-up scans read little else.
//!
//! # Costs
//! - `insert`: O(log n + extents overlapped). A read-only descent checks for overlap; overlapped extents
//!   are trimmed, split or removed in one pass over the affected subtrees (wholly covered subtrees are
//!   dropped, not rebalanced entry by entry), then the new extent is inserted by a second descent.
//! - `lookup`: O(log n + pieces returned). `changed_since`: O(answer × log n), pruned by `max_ops`.
//! - `snapshot`: O(1), an `Arc` clone of the root. The first change to a node shared with a snapshot
//!   copies it, and copying an internal node bumps its 31 children's reference counts (31 cold cache
//!   lines): the first insert after a snapshot costs ~10 µs at 1M extents instead of ~1.5 µs. A node is
//!   copied once per snapshot; after that it is private again.

//! # Snapshots and freed space
//! `freed` reports bytes that *this map* no longer references. A snapshot taken earlier may still
//! reference them: a caller that keeps snapshots (provisioning a slave) must hold those frees back
//! until the snapshot is dropped.

mod edit;
mod node;
#[cfg(test)]
mod tests;

pub use crate::alloc::Piece;
use crate::config::SECTOR_SIZE;
use node::{Child, Internal, KEY_UNUSED, LOCATION_ZERO, Leaf, Span, keys_at_or_below};

/// Where an extent's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Byte address in the data area.
    Data(u64),
    /// Trimmed or written with zeroes: reads as zeroes, occupies no data.
    Zero,
}

/// A range of the volume written by one op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub op: u64,
    pub location: Location,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// One piece of a lookup's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// An extent clipped to the queried range; a data location advanced by what was clipped off the front.
    Mapped(Extent),
    /// Never written: reads as zeroes.
    Hole { offset: u64, length: u64 },
}

/// The extent map of one volume copy. Cloning is `snapshot`.
#[derive(Clone, Debug)]
pub struct ExtentMap {
    root: Child,
    /// Levels of internal nodes above the leaves (0: the root is a leaf).
    height: usize,
    extent_count: usize,
}

impl Default for ExtentMap {
    fn default() -> Self {
        Self::new()
    }
}

fn encode_location(location: Location) -> u64 {
    match location {
        Location::Data(address) => address,
        Location::Zero => LOCATION_ZERO,
    }
}

fn decode_location(stored: u64) -> Location {
    if stored == LOCATION_ZERO {
        Location::Zero
    } else {
        Location::Data(stored)
    }
}

/// The stored location `skip` bytes into an extent stored at `stored`.
fn advance(stored: u64, skip: u64) -> u64 {
    if stored == LOCATION_ZERO {
        LOCATION_ZERO
    } else {
        stored + skip
    }
}

/// How a range meets the extents already in the map.
enum Overlap {
    None,
    /// One extent covers exactly the range.
    Exact,
    /// Anything else: part of one or more extents.
    Other,
}

fn leaf_extent(leaf: &Leaf, index: usize) -> Extent {
    debug_assert!(index < leaf.count);
    let span = leaf.spans[index];
    Extent {
        offset: leaf.offsets[index],
        length: span.length,
        op: leaf.ops[index],
        location: decode_location(span.location),
    }
}

impl ExtentMap {
    pub fn new() -> Self {
        ExtentMap {
            root: Child::Leaf(std::sync::Arc::new(Leaf::empty())),
            height: 0,
            extent_count: 0,
        }
    }

    /// Inserts an extent, the newest op for its range. Overlapped parts of older extents are removed;
    /// partially overlapped extents are split (the kept parts keep their op; a data location advances with
    /// the offset). Every data byte range that stops being referenced is appended to `freed`.
    ///
    /// The caller guarantees the extent is newer than everything it overlaps (commits go in op order; the
    /// pieces of one fragmented write share an op); a checkpoint loads its extents in offset order, with
    /// any ops, since none overlap. Debug builds check it.
    pub fn insert(&mut self, extent: Extent, freed: &mut Vec<Piece>) {
        // Extents come from notes, which came from the journal or a peer: check them whole.
        let end = extent.offset.checked_add(extent.length);
        assert!(
            extent.length > 0
                && extent.offset.is_multiple_of(SECTOR_SIZE)
                && extent.length.is_multiple_of(SECTOR_SIZE)
                && end.is_some_and(|end| end != KEY_UNUSED),
            "extent {extent:?} is not a non-empty, sector-aligned range"
        );
        if let Location::Data(address) = extent.location {
            assert!(
                address.is_multiple_of(SECTOR_SIZE) && address.checked_add(extent.length).is_some(),
                "extent {extent:?} has a misaligned or overflowing data location"
            );
        }
        let end = extent.offset + extent.length;
        let span = Span {
            length: extent.length,
            location: encode_location(extent.location),
        };
        let remainder = match self.overlap(extent.offset, end) {
            Overlap::None => None,
            // An overwrite of exactly one extent (random writes of one size, once the map is split
            // to that size): its entry is replaced in place, one descent instead of a removal and an
            // insert (measured: the map was 13 % of the reactor's time at QD32).
            Overlap::Exact => {
                edit::replace_in(&mut self.root, extent.offset, span, extent.op, freed);
                return;
            }
            Overlap::Other => self.remove_range(extent.offset, end, extent.op, freed),
        };
        self.insert_entry(extent.offset, span, extent.op);
        if let Some(remainder) = remainder {
            self.insert_entry(remainder.offset, remainder.span, remainder.op);
        }
    }

    /// Starts fetching the leaf that holds `offset` into the CPU's cache, without waiting for it. A
    /// write calls this when it arrives, so that its commit, tens of microseconds later, finds the leaf
    /// in cache: the leaves of a large map mostly are not (262,144 extents are 13 MB of leaves), and
    /// the miss on the leaf was most of `insert`'s time. The inner levels above it are few and stay
    /// cached.
    pub fn prefetch(&self, offset: u64) {
        let mut node = &self.root;
        loop {
            match node {
                Child::Internal(internal) => {
                    let index = keys_at_or_below(&internal.keys, offset).saturating_sub(1);
                    node = internal.child(index);
                }
                Child::Leaf(leaf) => {
                    node::prefetch_lines(std::sync::Arc::as_ptr(leaf).cast(), size_of::<Leaf>());
                    return;
                }
            }
        }
    }

    /// The mappings covering exactly `[offset, offset + length)`, in order: extents (clipped) and holes.
    /// Appends to `out`.
    pub fn lookup(&self, offset: u64, length: u64, out: &mut Vec<Mapping>) {
        // Requests were validated by the front-end; here it is an invariant.
        debug_assert!(offset.is_multiple_of(SECTOR_SIZE) && length.is_multiple_of(SECTOR_SIZE));
        debug_assert!(offset.checked_add(length).is_some());
        if length == 0 {
            return;
        }
        let end = offset + length;
        let mut covered_to = offset;
        lookup_in(&self.root, offset, end, &mut covered_to, out);
        if covered_to < end {
            out.push(Mapping::Hole {
                offset: covered_to,
                length: end - covered_to,
            });
        }
    }

    /// Every extent (whole, unclipped) whose op is greater than `op`, in offset order. Subtrees whose
    /// largest op is at most `op` are skipped, so the cost follows the answer, not the map.
    pub fn changed_since(&self, op: u64, out: &mut Vec<Extent>) {
        changed_in(&self.root, op, out);
    }

    /// A point-in-time copy in O(1). Nodes are shared and copied on write: neither map ever sees the other's
    /// later changes.
    pub fn snapshot(&self) -> ExtentMap {
        self.clone()
    }

    /// All extents in offset order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        Extents::new(&self.root)
    }

    pub fn extent_count(&self) -> usize {
        self.extent_count
    }

    /// The largest op in the map (0 when empty).
    pub fn max_op(&self) -> u64 {
        self.root.max_op()
    }

    /// How `[start, end)` meets the extents in the map. Read-only, so that an insert into fresh space
    /// does not copy (or even write) the nodes on its path twice.
    fn overlap(&self, start: u64, end: u64) -> Overlap {
        // The extent with the largest offset below `end` is the only candidate to reach into the range:
        // every earlier one ends at or before its offset. It is exactly the range when it starts at
        // `start` and ends at `end`; then no other extent meets the range.
        let mut node = &self.root;
        loop {
            match node {
                Child::Internal(internal) => {
                    let below = node::keys_below(&internal.keys, end);
                    if below == 0 {
                        return Overlap::None;
                    }
                    node = internal.child(below - 1);
                }
                Child::Leaf(leaf) => {
                    let below = node::keys_below(&leaf.offsets, end);
                    return if below == 0 || leaf.end(below - 1) <= start {
                        Overlap::None
                    } else if leaf.offsets[below - 1] == start && leaf.end(below - 1) == end {
                        Overlap::Exact
                    } else {
                        Overlap::Other
                    };
                }
            }
        }
    }
}

fn lookup_in(node: &Child, start: u64, end: u64, covered_to: &mut u64, out: &mut Vec<Mapping>) {
    match node {
        Child::Internal(internal) => {
            // The child holding the last extent starting at or before `start`, then its right siblings
            // while they start before `end`.
            let mut index = keys_at_or_below(&internal.keys, start).saturating_sub(1);
            while index < internal.count && internal.keys[index] < end {
                lookup_in(internal.child(index), start, end, covered_to, out);
                index += 1;
            }
        }
        Child::Leaf(leaf) => {
            let mut index = keys_at_or_below(&leaf.offsets, start).saturating_sub(1);
            while index < leaf.count && leaf.offsets[index] < end {
                let extent_start = leaf.offsets[index];
                let extent_end = leaf.end(index);
                if extent_end > *covered_to {
                    let clip_start = extent_start.max(*covered_to);
                    let clip_end = extent_end.min(end);
                    if clip_start > *covered_to {
                        out.push(Mapping::Hole {
                            offset: *covered_to,
                            length: clip_start - *covered_to,
                        });
                    }
                    out.push(Mapping::Mapped(Extent {
                        offset: clip_start,
                        length: clip_end - clip_start,
                        op: leaf.ops[index],
                        location: decode_location(advance(
                            leaf.spans[index].location,
                            clip_start - extent_start,
                        )),
                    }));
                    *covered_to = clip_end;
                }
                index += 1;
            }
        }
    }
}

fn changed_in(node: &Child, op: u64, out: &mut Vec<Extent>) {
    match node {
        Child::Internal(internal) => {
            for index in 0..internal.count {
                if internal.max_ops[index] > op {
                    changed_in(internal.child(index), op, out);
                }
            }
        }
        Child::Leaf(leaf) => {
            for index in 0..leaf.count {
                if leaf.ops[index] > op {
                    out.push(leaf_extent(leaf, index));
                }
            }
        }
    }
}

/// In-order walk over the leaves. The stack holds, per internal level, the node and the next child to
/// visit; its depth is the tree height.
struct Extents<'a> {
    stack: Vec<(&'a Internal, usize)>,
    leaf: Option<&'a Leaf>,
    index: usize,
}

impl<'a> Extents<'a> {
    fn new(root: &'a Child) -> Self {
        let mut extents = Extents {
            stack: Vec::new(),
            leaf: None,
            index: 0,
        };
        extents.descend(root);
        extents
    }

    /// Goes down the leftmost path of `node`.
    fn descend(&mut self, mut node: &'a Child) {
        loop {
            match node {
                Child::Internal(internal) => {
                    self.stack.push((internal, 1));
                    node = internal.child(0);
                }
                Child::Leaf(leaf) => {
                    self.leaf = Some(leaf);
                    self.index = 0;
                    return;
                }
            }
        }
    }
}

impl Iterator for Extents<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        loop {
            let leaf = self.leaf?;
            if self.index < leaf.count {
                self.index += 1;
                return Some(leaf_extent(leaf, self.index - 1));
            }
            // Leaf exhausted: climb to the first ancestor with a child left, then go down its left side.
            self.leaf = None;
            while let Some((internal, next)) = self.stack.pop() {
                if next < internal.count {
                    self.stack.push((internal, next + 1));
                    self.descend(internal.child(next));
                    break;
                }
            }
        }
    }
}
