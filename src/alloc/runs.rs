//! The free runs of a data area, in address order, in a B+-tree whose inner nodes also hold the length
//! of the longest run below each child.
//!
//! Owns: the set of runs (start -> length) and the tree that indexes them. One structure answers every
//! question the allocator asks: the run at or before an address, the run after it, and the longest run
//! (leftmost among equals), each in one descent of a shallow tree (31-way nodes: three levels hold
//! 30,000 runs). It replaces a pair of ordered maps (by offset, by length) that cost two to three
//! times as many node visits per allocation and free.
//! Must never: decide policy (no coalescing, no choice of run: that is `Allocator`'s), or leave a key
//! slot past `count` holding anything but `KEY_UNUSED` (the branch-free search counts on it).

/// Entries per node, leaf or inner: 31 keys plus the count fill four cache lines.
const NODE_ENTRIES_MAX: usize = 31;
/// Below this many entries a node other than the root is merged into a sibling when the two fit in
/// `MERGED_ENTRIES_MAX`. Lower than half, so that an insert/remove pair at a boundary does not split and
/// merge the same nodes back and forth.
const NODE_ENTRIES_MIN: usize = 8;
const MERGED_ENTRIES_MAX: usize = 24;
/// Key of an unused slot: above every real key, so that counting the keys at or below an address needs
/// no comparison with `count`.
const KEY_UNUSED: u64 = u64::MAX;
/// Deepest tree: a level is added only when the root splits, so 31-way nodes never get near it.
const HEIGHT_MAX: usize = 16;

/// A leaf (runs: start -> length) or an inner node (children: smallest start below -> longest run
/// below). `keys` and `count` are all a search reads.
#[derive(Clone)]
#[repr(C, align(64))]
struct Node {
    keys: [u64; NODE_ENTRIES_MAX],
    count: u32,
    values: [u64; NODE_ENTRIES_MAX],
    /// Node indexes of the children (inner nodes only).
    children: [u32; NODE_ENTRIES_MAX],
}

impl Node {
    fn empty() -> Node {
        Node {
            keys: [KEY_UNUSED; NODE_ENTRIES_MAX],
            count: 0,
            values: [0; NODE_ENTRIES_MAX],
            children: [0; NODE_ENTRIES_MAX],
        }
    }

    fn len(&self) -> usize {
        self.count as usize
    }

    /// How many keys are at or below `address`: branch-free over all slots (unused keys are above).
    fn keys_at_or_below(&self, address: u64) -> usize {
        self.keys
            .iter()
            .map(|&key| usize::from(key <= address))
            .sum()
    }

    /// The longest run below this node (0 when empty).
    fn longest(&self) -> u64 {
        self.values[..self.len()].iter().copied().max().unwrap_or(0)
    }

    fn insert(&mut self, slot: usize, key: u64, value: u64, child: u32) {
        let count = self.len();
        debug_assert!(count < NODE_ENTRIES_MAX && slot <= count);
        self.keys.copy_within(slot..count, slot + 1);
        self.values.copy_within(slot..count, slot + 1);
        self.children.copy_within(slot..count, slot + 1);
        self.keys[slot] = key;
        self.values[slot] = value;
        self.children[slot] = child;
        self.count += 1;
    }

    fn remove(&mut self, slot: usize) {
        let count = self.len();
        debug_assert!(slot < count);
        self.keys.copy_within(slot + 1..count, slot);
        self.values.copy_within(slot + 1..count, slot);
        self.children.copy_within(slot + 1..count, slot);
        self.keys[count - 1] = KEY_UNUSED;
        self.count -= 1;
    }

    /// Appends all of `other`'s entries (which must all sort after this node's).
    fn append(&mut self, other: &Node) {
        let (count, moved) = (self.len(), other.len());
        debug_assert!(count + moved <= NODE_ENTRIES_MAX);
        self.keys[count..count + moved].copy_from_slice(&other.keys[..moved]);
        self.values[count..count + moved].copy_from_slice(&other.values[..moved]);
        self.children[count..count + moved].copy_from_slice(&other.children[..moved]);
        self.count += moved as u32;
    }

    /// Moves the upper half of the entries into a new node, which it returns.
    fn split_off_upper_half(&mut self) -> Node {
        let count = self.len();
        let keep = count / 2;
        let mut upper = Node::empty();
        upper.keys[..count - keep].copy_from_slice(&self.keys[keep..count]);
        upper.values[..count - keep].copy_from_slice(&self.values[keep..count]);
        upper.children[..count - keep].copy_from_slice(&self.children[keep..count]);
        upper.count = (count - keep) as u32;
        self.keys[keep..count].fill(KEY_UNUSED);
        self.count = keep as u32;
        upper
    }
}

/// The nodes from the root down to a leaf, and the slot taken at each: in an inner node the child
/// descended into; in the leaf, how many of its runs start at or below the address searched for.
#[derive(Clone, Copy)]
pub(super) struct Path {
    nodes: [u32; HEIGHT_MAX + 1],
    slots: [usize; HEIGHT_MAX + 1],
}

/// How the lengths below a node changed, for `fix_upwards`.
#[derive(Clone, Copy)]
enum Change {
    /// A length became this (the rest as they were).
    Grew(u64),
    /// A length that was this shrank or left.
    Shrank(u64),
}

/// A free run: start and length in bytes.
pub(super) type Run = (u64, u64);

/// The free runs of a data area. See the module documentation.
#[derive(Clone)]
pub(super) struct FreeRuns {
    nodes: Vec<Node>,
    /// Indexes of nodes no longer in the tree, reused before `nodes` grows.
    spare_nodes: Vec<u32>,
    root: u32,
    /// Inner levels above the leaves (0: the root is the only leaf).
    height: usize,
    run_count: usize,
}

impl std::fmt::Debug for FreeRuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreeRuns")
            .field("run_count", &self.run_count)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

impl FreeRuns {
    pub(super) fn new() -> FreeRuns {
        FreeRuns {
            nodes: vec![Node::empty()],
            spare_nodes: Vec::new(),
            root: 0,
            height: 0,
            run_count: 0,
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.run_count
    }

    /// Descends towards `address`. The leaf slot counts the leaf's runs starting at or below it, so the
    /// run at or before `address` (if any) is at slot - 1 of that leaf: every leaf but the leftmost
    /// starts at or below the address that led to it.
    pub(super) fn descend(&self, address: u64) -> Path {
        let mut path = Path {
            nodes: [0; HEIGHT_MAX + 1],
            slots: [0; HEIGHT_MAX + 1],
        };
        let mut node = self.root;
        for level in 0..self.height {
            let inner = &self.nodes[node as usize];
            let slot = inner.keys_at_or_below(address).saturating_sub(1);
            path.nodes[level] = node;
            path.slots[level] = slot;
            node = inner.children[slot];
        }
        path.nodes[self.height] = node;
        path.slots[self.height] = self.nodes[node as usize].keys_at_or_below(address);
        path
    }

    /// The run starting at or before the address `path` was made for.
    pub(super) fn at_or_before(&self, path: &Path) -> Option<Run> {
        let leaf = &self.nodes[path.nodes[self.height] as usize];
        let slot = path.slots[self.height].checked_sub(1)?;
        Some((leaf.keys[slot], leaf.values[slot]))
    }

    /// The first run starting after the address `path` was made for.
    pub(super) fn after(&self, path: &Path) -> Option<Run> {
        let leaf = &self.nodes[path.nodes[self.height] as usize];
        let slot = path.slots[self.height];
        if slot < leaf.len() {
            return Some((leaf.keys[slot], leaf.values[slot]));
        }
        // The leftmost run of the next subtree to the right.
        let level = (0..self.height)
            .rev()
            .find(|&level| path.slots[level] + 1 < self.nodes[path.nodes[level] as usize].len())?;
        let mut node = self.nodes[path.nodes[level] as usize].children[path.slots[level] + 1];
        for _ in level + 1..self.height {
            node = self.nodes[node as usize].children[0];
        }
        let leaf = &self.nodes[node as usize];
        Some((leaf.keys[0], leaf.values[0]))
    }

    /// The longest run, leftmost among equals, with a path to it (as if descended to its start).
    pub(super) fn longest(&self) -> Option<(Run, Path)> {
        if self.run_count == 0 {
            return None;
        }
        let mut path = Path {
            nodes: [0; HEIGHT_MAX + 1],
            slots: [0; HEIGHT_MAX + 1],
        };
        let longest = self.nodes[self.root as usize].longest();
        let mut node = self.root;
        for level in 0..self.height {
            let slot = Self::first_with_value(&self.nodes[node as usize], longest);
            path.nodes[level] = node;
            path.slots[level] = slot;
            node = self.nodes[node as usize].children[slot];
        }
        let leaf = &self.nodes[node as usize];
        let slot = Self::first_with_value(leaf, longest);
        path.nodes[self.height] = node;
        path.slots[self.height] = slot + 1;
        Some(((leaf.keys[slot], leaf.values[slot]), path))
    }

    fn first_with_value(node: &Node, value: u64) -> usize {
        let slot = node.values[..node.len()].iter().position(|&v| v == value);
        slot.expect("an inner node's longest run is below one of its children")
    }

    /// Changes the run before the leaf slot of `path` (the run at or before its address) to
    /// `(start, length)`, which must keep it between its neighbours.
    pub(super) fn replace_at_or_before(&mut self, path: &Path, start: u64, length: u64) {
        debug_assert!(length > 0);
        let leaf = path.nodes[self.height] as usize;
        let slot = path.slots[self.height] - 1;
        let old_length = self.nodes[leaf].values[slot];
        self.nodes[leaf].keys[slot] = start;
        self.nodes[leaf].values[slot] = length;
        let change = if length >= old_length {
            Change::Grew(length)
        } else {
            Change::Shrank(old_length)
        };
        self.fix_upwards(path, self.height, change);
    }

    /// Changes the first run after the address `path` was made for (see `after`) to
    /// `(start, length)`, which must keep it between its neighbours.
    pub(super) fn replace_after(&mut self, path: &Path, start: u64, length: u64) {
        let leaf = path.nodes[self.height] as usize;
        let mut path = *path;
        if path.slots[self.height] >= self.nodes[leaf].len() {
            // In a leaf further right: descend to it.
            let (old_start, _) = self.after(&path).expect("a run after the path");
            path = self.descend(old_start);
            debug_assert_eq!(self.at_or_before(&path).map(|run| run.0), Some(old_start));
        } else {
            path.slots[self.height] += 1;
        }
        self.replace_at_or_before(&path, start, length);
    }

    /// Removes the run starting at `start`.
    pub(super) fn remove(&mut self, start: u64) {
        let path = self.descend(start);
        debug_assert_eq!(self.at_or_before(&path).map(|run| run.0), Some(start));
        self.remove_at_or_before(&path);
    }

    /// Inserts a run at the leaf slot of `path`, which must be where its start sorts.
    pub(super) fn insert_at(&mut self, path: &Path, start: u64, length: u64) {
        debug_assert!(length > 0);
        self.run_count += 1;
        let (mut key, mut value, mut child) = (start, length, 0);
        let mut level = self.height;
        loop {
            let node = path.nodes[level];
            let slot = path.slots[level] + usize::from(level < self.height);
            if self.nodes[node as usize].len() < NODE_ENTRIES_MAX {
                self.nodes[node as usize].insert(slot, key, value, child);
                // Below every ancestor the runs are those of before plus this one, however the nodes
                // under it were split.
                self.fix_upwards(path, level, Change::Grew(length));
                return;
            }
            // Full: split, insert into the half the slot falls in, then insert the upper half into the
            // parent (or into a new root).
            let upper = self.nodes[node as usize].split_off_upper_half();
            let lower_count = self.nodes[node as usize].len();
            let upper_index = self.allocate_node(upper);
            if slot <= lower_count {
                self.nodes[node as usize].insert(slot, key, value, child);
            } else {
                self.nodes[upper_index as usize].insert(slot - lower_count, key, value, child);
            }
            let lower = &self.nodes[node as usize];
            let (lower_key, lower_longest) = (lower.keys[0], lower.longest());
            let upper = &self.nodes[upper_index as usize];
            (key, value, child) = (upper.keys[0], upper.longest(), upper_index);
            if level == 0 {
                let mut root = Node::empty();
                root.insert(0, lower_key, lower_longest, node);
                root.insert(1, key, value, child);
                self.root = self.allocate_node(root);
                self.height += 1;
                assert!(
                    self.height <= HEIGHT_MAX,
                    "free-run tree deeper than {HEIGHT_MAX}"
                );
                return;
            }
            let parent = &mut self.nodes[path.nodes[level - 1] as usize];
            parent.keys[path.slots[level - 1]] = lower_key;
            parent.values[path.slots[level - 1]] = lower_longest;
            level -= 1;
        }
    }

    /// Removes the run before the leaf slot of `path` (the run at or before its address).
    pub(super) fn remove_at_or_before(&mut self, path: &Path) {
        self.run_count -= 1;
        let mut path = *path;
        path.slots[self.height] -= 1;
        let leaf = &self.nodes[path.nodes[self.height] as usize];
        // Below every ancestor the runs are those of before less this one, however the nodes under
        // it are merged.
        let change = Change::Shrank(leaf.values[path.slots[self.height]]);
        let mut level = self.height;
        loop {
            let node = path.nodes[level] as usize;
            self.nodes[node].remove(path.slots[level]);
            if level == 0 {
                // The root: drop inner levels left with a single child.
                while self.height > 0 && self.nodes[self.root as usize].len() == 1 {
                    let old_root = self.root;
                    self.root = self.nodes[old_root as usize].children[0];
                    self.release_node(old_root);
                    self.height -= 1;
                }
                return;
            }
            let count = self.nodes[node].len();
            if count >= NODE_ENTRIES_MIN {
                self.fix_upwards(&path, level, change);
                return;
            }
            let parent = path.nodes[level - 1] as usize;
            let slot = path.slots[level - 1];
            if count == 0 {
                // Empty: unlink it from the parent.
                self.release_node(node as u32);
                level -= 1;
                continue;
            }
            // Merge with a sibling (the right one of the pair absorbed into the left) when both fit.
            let (left_slot, right_slot) = if slot > 0 {
                (slot - 1, slot)
            } else if slot + 1 < self.nodes[parent].len() {
                (slot, slot + 1)
            } else {
                self.fix_upwards(&path, level, change);
                return;
            };
            let left = self.nodes[parent].children[left_slot];
            let right = self.nodes[parent].children[right_slot];
            if self.nodes[left as usize].len() + self.nodes[right as usize].len()
                > MERGED_ENTRIES_MAX
            {
                self.fix_upwards(&path, level, change);
                return;
            }
            let absorbed = self.nodes[right as usize].clone();
            self.nodes[left as usize].append(&absorbed);
            self.release_node(right);
            let left_node = &self.nodes[left as usize];
            let (left_key, left_longest) = (left_node.keys[0], left_node.longest());
            self.nodes[parent].keys[left_slot] = left_key;
            self.nodes[parent].values[left_slot] = left_longest;
            path.slots[level - 1] = right_slot;
            level -= 1;
        }
    }

    /// Updates the key and longest run that each ancestor of `path`'s node at `level` holds for it,
    /// after `change` to that node, stopping where nothing changes. Knowing how the longest run moved
    /// spares rescanning a node's lengths in the common cases (a run grew, or a run other than the
    /// longest shrank or left).
    fn fix_upwards(&mut self, path: &Path, level: usize, change: Change) {
        let mut change = change;
        for level in (1..=level).rev() {
            let child = &self.nodes[path.nodes[level] as usize];
            let slot = path.slots[level - 1];
            let old = self.nodes[path.nodes[level - 1] as usize].values[slot];
            let longest = match change {
                Change::Grew(length) => old.max(length),
                Change::Shrank(length) if length < old => old,
                Change::Shrank(_) => child.longest(),
            };
            let key = child.keys[0];
            let parent = &mut self.nodes[path.nodes[level - 1] as usize];
            if parent.keys[slot] == key && old == longest {
                return;
            }
            parent.keys[slot] = key;
            parent.values[slot] = longest;
            change = if longest >= old {
                Change::Grew(longest)
            } else {
                Change::Shrank(old)
            };
        }
    }

    fn allocate_node(&mut self, node: Node) -> u32 {
        if let Some(index) = self.spare_nodes.pop() {
            self.nodes[index as usize] = node;
            return index;
        }
        self.nodes.push(node);
        u32::try_from(self.nodes.len() - 1).expect("fewer than 2^32 free-run tree nodes")
    }

    fn release_node(&mut self, index: u32) {
        self.nodes[index as usize].count = 0;
        self.nodes[index as usize].keys.fill(KEY_UNUSED);
        self.spare_nodes.push(index);
    }

    /// Every run in address order (tests only).
    #[cfg(test)]
    pub(super) fn runs(&self) -> Vec<Run> {
        let mut runs = Vec::new();
        self.collect(self.root, self.height, &mut runs);
        runs
    }

    #[cfg(test)]
    fn collect(&self, node: u32, height: usize, runs: &mut Vec<Run>) {
        let node = &self.nodes[node as usize];
        for slot in 0..node.len() {
            if height == 0 {
                runs.push((node.keys[slot], node.values[slot]));
            } else {
                self.collect(node.children[slot], height - 1, runs);
            }
        }
    }

    /// Checks the tree's invariants: keys sorted, unused slots unused, every inner entry holding its
    /// child's first key and longest run, no empty node below the root, leaves all at one depth.
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        let count = self.check_node(self.root, self.height, true);
        assert_eq!(count, self.run_count);
    }

    #[cfg(test)]
    fn check_node(&self, index: u32, height: usize, is_root: bool) -> usize {
        let node = &self.nodes[index as usize];
        assert!(is_root || node.len() > 0, "empty node below the root");
        assert!(node.keys[..node.len()].is_sorted_by(|a, b| a < b));
        assert!(node.keys[node.len()..].iter().all(|&key| key == KEY_UNUSED));
        if height == 0 {
            return node.len();
        }
        assert!(node.len() >= 2 || !is_root, "an inner root with one child");
        let mut runs = 0;
        for slot in 0..node.len() {
            let child = &self.nodes[node.children[slot] as usize];
            assert_eq!(node.keys[slot], child.keys[0]);
            assert_eq!(node.values[slot], child.longest());
            runs += self.check_node(node.children[slot], height - 1, false);
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// Checks every query against the model, at addresses around each run and between runs.
    fn check_queries(runs: &FreeRuns, model: &BTreeMap<u64, u64>, probes: &[u64]) {
        runs.check_invariants();
        assert_eq!(
            runs.runs(),
            model.iter().map(|(&s, &l)| (s, l)).collect::<Vec<_>>()
        );
        for &address in probes {
            let path = runs.descend(address);
            let before = model.range(..=address).next_back().map(|(&s, &l)| (s, l));
            let after = model.range(address + 1..).next().map(|(&s, &l)| (s, l));
            assert_eq!(runs.at_or_before(&path), before, "at or before {address}");
            assert_eq!(runs.after(&path), after, "after {address}");
        }
        let longest = model.values().copied().max();
        let leftmost = longest.and_then(|longest| model.iter().find(|&(_, &l)| l == longest));
        let found = runs.longest();
        assert_eq!(found.map(|(run, _)| run), leftmost.map(|(&s, &l)| (s, l)));
        if let Some((run, path)) = found {
            assert_eq!(runs.at_or_before(&path), Some(run));
        }
    }

    /// Many runs (several tree levels), inserted, changed and removed in random order through every
    /// entry point, checked against a `BTreeMap` after each batch.
    #[test]
    fn matches_a_map_through_growth_and_shrinkage() {
        let mut random = crate::sim_rng::Rng::new(5);
        let mut runs = FreeRuns::new();
        let mut model = BTreeMap::new();
        let mut tallest = 0;
        // Keys are multiples of 16 (room to move a start without passing a neighbour); lengths 1..=8.
        let key_space = 40_000u64;
        for round in 0..60 {
            let growing = round % 20 < 12;
            for _ in 0..500 {
                let key = random.below(key_space) * 16;
                let path = runs.descend(key);
                let present = runs.at_or_before(&path).is_some_and(|(s, _)| s == key);
                if !present && (growing || random.below(4) == 0) {
                    let length = 1 + random.below(8);
                    runs.insert_at(&path, key, length);
                    model.insert(key, length);
                } else if present && !growing && random.below(3) > 0 {
                    if random.below(2) == 0 {
                        runs.remove_at_or_before(&path);
                    } else {
                        runs.remove(key);
                    }
                    model.remove(&key);
                } else if present {
                    // Move the start up (short of the next run), change the length.
                    let (start, length) = (key + random.below(8), 1 + random.below(8));
                    if start > key && model.range(key + 1..=start).next().is_some() {
                        continue;
                    }
                    runs.replace_at_or_before(&path, start, length);
                    model.remove(&key);
                    model.insert(start, length);
                } else if let Some((after_start, _)) = runs.after(&path)
                    && after_start % 16 == 0
                {
                    let (start, length) = (after_start - random.below(8), 1 + random.below(8));
                    runs.replace_after(&path, start, length);
                    model.remove(&after_start);
                    model.insert(start, length);
                }
                runs.check_invariants();
            }
            let probes: Vec<u64> = (0..200).map(|_| random.below(key_space * 16)).collect();
            check_queries(&runs, &model, &probes);
            tallest = tallest.max(runs.height);
        }
        assert!(tallest >= 2, "the test never built a three-level tree");
        while let Some((&key, _)) = model.iter().next() {
            runs.remove(key);
            model.remove(&key);
        }
        check_queries(&runs, &model, &[0, 1000]);
        assert_eq!(runs.height, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Small trees, where splits and merges happen at every other step.
        #[test]
        fn small_trees_match_a_map(steps in proptest::collection::vec((0u64..400, 1u64..6, any::<bool>()), 1..600)) {
            let mut runs = FreeRuns::new();
            let mut model = BTreeMap::new();
            for (key, length, insert) in steps {
                let key = key * 8;
                let path = runs.descend(key);
                let present = model.contains_key(&key);
                if insert && !present {
                    runs.insert_at(&path, key, length);
                    model.insert(key, length);
                } else if !insert && present {
                    runs.remove_at_or_before(&path);
                    model.remove(&key);
                }
                runs.check_invariants();
            }
            let probes: Vec<u64> = (0..3300).step_by(7).collect();
            check_queries(&runs, &model, &probes);
        }
    }
}
