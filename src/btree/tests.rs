//! Tests of the extent map: unit tests of the edge cases, and model-based property tests against a
//! one-entry-per-sector reference model.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

const SECTOR: u64 = SECTOR_SIZE;

fn data(offset_sectors: u64, length_sectors: u64, op: u64, address_sectors: u64) -> Extent {
    Extent {
        offset: offset_sectors * SECTOR,
        length: length_sectors * SECTOR,
        op,
        location: Location::Data(address_sectors * SECTOR),
    }
}

fn zero(offset_sectors: u64, length_sectors: u64, op: u64) -> Extent {
    Extent {
        offset: offset_sectors * SECTOR,
        length: length_sectors * SECTOR,
        op,
        location: Location::Zero,
    }
}

fn piece(address_sectors: u64, length_sectors: u64) -> Piece {
    Piece {
        address: address_sectors * SECTOR,
        length: length_sectors * SECTOR,
    }
}

fn lookup(map: &ExtentMap, offset_sectors: u64, length_sectors: u64) -> Vec<Mapping> {
    let mut out = Vec::new();
    map.lookup(offset_sectors * SECTOR, length_sectors * SECTOR, &mut out);
    out
}

fn hole(offset_sectors: u64, length_sectors: u64) -> Mapping {
    Mapping::Hole {
        offset: offset_sectors * SECTOR,
        length: length_sectors * SECTOR,
    }
}

#[test]
fn overwrite_in_the_middle_splits_into_three() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    map.insert(data(0, 16, 1, 1000), &mut freed);
    assert!(freed.is_empty());
    map.insert(data(4, 4, 2, 5000), &mut freed);
    assert_eq!(freed, [piece(1004, 4)]);
    let extents: Vec<Extent> = map.iter().collect();
    assert_eq!(
        extents,
        [
            data(0, 4, 1, 1000),
            data(4, 4, 2, 5000),
            data(8, 8, 1, 1008)
        ]
    );
    assert_eq!(map.extent_count(), 3);
    assert_eq!(map.max_op(), 2);
    map.check_invariants();
}

#[test]
fn overwrite_trims_both_neighbours_and_drops_the_covered() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    map.insert(data(0, 8, 1, 100), &mut freed);
    map.insert(data(8, 8, 2, 200), &mut freed);
    map.insert(data(16, 8, 3, 300), &mut freed);
    map.insert(data(6, 12, 4, 400), &mut freed);
    assert_eq!(freed, [piece(106, 2), piece(200, 8), piece(300, 2)]);
    let extents: Vec<Extent> = map.iter().collect();
    assert_eq!(
        extents,
        [data(0, 6, 1, 100), data(6, 12, 4, 400), data(18, 6, 3, 302)]
    );
    map.check_invariants();
}

#[test]
fn zero_extents_free_data_and_carry_their_op() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    map.insert(data(0, 16, 1, 100), &mut freed);
    map.insert(zero(4, 8, 2), &mut freed);
    assert_eq!(freed, [piece(104, 8)]);
    freed.clear();
    // Overwriting a zero extent frees nothing.
    map.insert(data(6, 2, 3, 900), &mut freed);
    assert!(freed.is_empty());
    assert_eq!(
        lookup(&map, 2, 12),
        [
            Mapping::Mapped(data(2, 2, 1, 102)),
            Mapping::Mapped(zero(4, 2, 2)),
            Mapping::Mapped(data(6, 2, 3, 900)),
            Mapping::Mapped(zero(8, 4, 2)),
            Mapping::Mapped(data(12, 2, 1, 112)),
        ]
    );
    let mut changed = Vec::new();
    map.changed_since(1, &mut changed);
    assert_eq!(changed, [zero(4, 2, 2), data(6, 2, 3, 900), zero(8, 4, 2)]);
    changed.clear();
    map.changed_since(3, &mut changed);
    assert!(changed.is_empty());
    map.check_invariants();
}

#[test]
fn holes_are_reported_at_start_middle_and_end() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    assert_eq!(lookup(&map, 0, 8), [hole(0, 8)]);
    map.insert(data(4, 4, 1, 100), &mut freed);
    map.insert(data(12, 4, 2, 200), &mut freed);
    assert_eq!(
        lookup(&map, 0, 20),
        [
            hole(0, 4),
            Mapping::Mapped(data(4, 4, 1, 100)),
            hole(8, 4),
            Mapping::Mapped(data(12, 4, 2, 200)),
            hole(16, 4),
        ]
    );
    // A range inside one extent, inside one hole, and touching an extent's end.
    assert_eq!(lookup(&map, 5, 2), [Mapping::Mapped(data(5, 2, 1, 101))]);
    assert_eq!(lookup(&map, 9, 2), [hole(9, 2)]);
    assert_eq!(lookup(&map, 8, 4), [hole(8, 4)]);
    assert_eq!(lookup(&map, 100, 4), [hole(100, 4)]);
    assert!(lookup(&map, 3, 0).is_empty());
}

#[test]
fn snapshots_are_isolated_both_ways() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    for index in 0..500 {
        map.insert(data(index * 2, 1, index + 1, index), &mut freed);
    }
    let before: Vec<Extent> = map.iter().collect();
    let mut snapshot = map.snapshot();
    map.insert(zero(0, 1000, 501), &mut freed);
    assert_eq!(map.extent_count(), 1);
    assert_eq!(snapshot.iter().collect::<Vec<_>>(), before);
    snapshot.insert(data(1, 1, 502, 9000), &mut freed);
    assert_eq!(snapshot.extent_count(), 501);
    assert_eq!(map.iter().collect::<Vec<_>>(), [zero(0, 1000, 501)]);
    map.check_invariants();
    snapshot.check_invariants();
}

/// Overwrites of exactly one extent replace it in place: the old data is freed, a snapshot taken before
/// keeps the old entries, the shape (extent count) is unchanged and `changed_since` finds the new ops.
#[test]
fn exact_overwrites_replace_in_place_under_a_snapshot() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    for index in 0..2000 {
        map.insert(data(index * 8, 8, index + 1, index * 8), &mut freed);
    }
    assert!(freed.is_empty());
    let before: Vec<Extent> = map.iter().collect();
    let snapshot = map.snapshot();
    for (op, index) in (2001..).zip([0u64, 1999, 777, 778, 1000]) {
        map.insert(data(index * 8, 8, op, 100_000 + index * 8), &mut freed);
    }
    // A zero extent over a data one, and data over that zero extent.
    map.insert(zero(5 * 8, 8, 2006), &mut freed);
    map.insert(data(5 * 8, 8, 2007, 200_000), &mut freed);
    let mut expected_freed: Vec<Piece> = [0u64, 1999, 777, 778, 1000, 5]
        .iter()
        .map(|&index| piece(index * 8, 8))
        .collect();
    expected_freed.sort_by_key(|piece| piece.address);
    freed.sort_by_key(|piece| piece.address);
    assert_eq!(freed, expected_freed);
    assert_eq!(map.extent_count(), 2000);
    assert_eq!(snapshot.iter().collect::<Vec<_>>(), before);
    assert_eq!(
        lookup(&map, 777 * 8, 8),
        [Mapping::Mapped(data(777 * 8, 8, 2003, 100_000 + 777 * 8))]
    );
    assert_eq!(
        lookup(&map, 5 * 8, 8),
        [Mapping::Mapped(data(5 * 8, 8, 2007, 200_000))]
    );
    let mut changed = Vec::new();
    map.changed_since(2000, &mut changed);
    let mut ops: Vec<u64> = changed.iter().map(|extent| extent.op).collect();
    ops.sort_unstable();
    assert_eq!(ops, [2001, 2002, 2003, 2004, 2005, 2007]);
    assert_eq!(map.max_op(), 2007);
    map.check_invariants();
    snapshot.check_invariants();
}

#[test]
#[should_panic(expected = "sector-aligned")]
fn misaligned_extent_is_refused() {
    let mut map = ExtentMap::new();
    map.insert(
        Extent {
            offset: 100,
            length: SECTOR,
            op: 1,
            location: Location::Zero,
        },
        &mut Vec::new(),
    );
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "older than what it overlaps")]
fn older_op_over_newer_is_refused() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    map.insert(zero(0, 4, 5), &mut freed);
    map.insert(zero(2, 4, 4), &mut freed);
}

#[test]
fn checkpoint_load_in_offset_order_accepts_any_ops() {
    let mut map = ExtentMap::new();
    let mut freed = Vec::new();
    for (index, op) in [7, 3, 9, 1, 4].into_iter().enumerate() {
        map.insert(data(index as u64 * 8, 8, op, index as u64 * 8), &mut freed);
    }
    assert!(freed.is_empty());
    assert_eq!(map.max_op(), 9);
    let mut changed = Vec::new();
    map.changed_since(4, &mut changed);
    assert_eq!(changed, [data(0, 8, 7, 0), data(16, 8, 9, 16)]);
}

/// A prefetch walks the tree at any offset (before, inside, between and past the extents; on an empty,
/// a one-leaf and a three-level map) and changes nothing.
#[test]
fn prefetch_reaches_a_leaf_and_changes_nothing() {
    let mut map = ExtentMap::new();
    map.prefetch(0);
    let mut freed = Vec::new();
    for sizes in [4u64, 2_000] {
        for index in 0..sizes {
            map.insert(
                data(index * 16 + 8, 8, sizes + index, index * 8),
                &mut freed,
            );
        }
        let before: Vec<Extent> = map.iter().collect();
        for offset_sectors in [0, 8, 12, 16, 24 * 16, sizes * 16 + 64, u64::MAX / 1024] {
            map.prefetch(offset_sectors * SECTOR);
        }
        assert_eq!(map.iter().collect::<Vec<_>>(), before);
    }
    assert!(map.height >= 2, "the map never got three levels");
}

// ---------------------------------------------------------------------------------------------------
// Reference model: one state per sector.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SectorState {
    Unwritten,
    /// Written by `op`; `address` is this sector's data address, or `None` for zeroes.
    Written {
        op: u64,
        address: Option<u64>,
    },
}

#[derive(Clone, Debug)]
struct Model {
    sectors: Vec<SectorState>,
    /// Data sector addresses ever inserted into this map (or the map it was snapshotted from).
    inserted: BTreeSet<u64>,
    /// Data sector addresses reported freed.
    freed: BTreeSet<u64>,
}

impl Model {
    fn new(sectors: usize) -> Self {
        Model {
            sectors: vec![SectorState::Unwritten; sectors],
            inserted: BTreeSet::new(),
            freed: BTreeSet::new(),
        }
    }

    /// Whether sector `index` continues the extent that sector `index - 1` belongs to.
    fn continues(&self, index: usize) -> bool {
        match (self.sectors[index - 1], self.sectors[index]) {
            (
                SectorState::Written {
                    op: previous_op,
                    address: previous_address,
                },
                SectorState::Written { op, address },
            ) => {
                previous_op == op
                    && match (previous_address, address) {
                        (None, None) => true,
                        (Some(previous), Some(this)) => this == previous + SECTOR,
                        _ => false,
                    }
            }
            _ => false,
        }
    }

    /// The extents (or holes) of `[start, end)` in sectors, as a lookup must return them.
    fn mappings(&self, start: usize, end: usize) -> Vec<Mapping> {
        let mut out = Vec::new();
        let mut run_start = start;
        for index in start + 1..=end {
            if index < end && self.continues_or_both_unwritten(index) {
                continue;
            }
            let (offset, length) = (
                run_start as u64 * SECTOR,
                (index - run_start) as u64 * SECTOR,
            );
            out.push(match self.sectors[run_start] {
                SectorState::Unwritten => Mapping::Hole { offset, length },
                SectorState::Written { op, address } => Mapping::Mapped(Extent {
                    offset,
                    length,
                    op,
                    location: address.map_or(Location::Zero, Location::Data),
                }),
            });
            run_start = index;
        }
        out
    }

    fn continues_or_both_unwritten(&self, index: usize) -> bool {
        self.sectors[index - 1] == SectorState::Unwritten
            && self.sectors[index] == SectorState::Unwritten
            || self.continues(index)
    }

    /// All extents, whole.
    fn extents(&self) -> Vec<Extent> {
        self.mappings(0, self.sectors.len())
            .into_iter()
            .filter_map(|mapping| match mapping {
                Mapping::Mapped(extent) => Some(extent),
                Mapping::Hole { .. } => None,
            })
            .collect()
    }

    fn live_addresses(&self) -> BTreeSet<u64> {
        self.sectors
            .iter()
            .filter_map(|state| match state {
                SectorState::Written { address, .. } => *address,
                SectorState::Unwritten => None,
            })
            .collect()
    }

    /// Applies an insert to the model and checks what the map reported freed for it.
    fn insert(&mut self, extent: Extent, freed: &[Piece]) -> Result<(), TestCaseError> {
        let first = (extent.offset / SECTOR) as usize;
        let count = (extent.length / SECTOR) as usize;
        let mut expected_freed = BTreeSet::new();
        for (index, state) in self.sectors[first..first + count].iter_mut().enumerate() {
            if let SectorState::Written {
                address: Some(address),
                ..
            } = *state
            {
                expected_freed.insert(address);
            }
            let address = match extent.location {
                Location::Data(base) => {
                    let address = base + index as u64 * SECTOR;
                    prop_assert!(self.inserted.insert(address), "test reused an address");
                    Some(address)
                }
                Location::Zero => None,
            };
            *state = SectorState::Written {
                op: extent.op,
                address,
            };
        }
        let mut reported = BTreeSet::new();
        for piece in freed {
            prop_assert!(
                piece.length > 0 && piece.address % SECTOR == 0 && piece.length % SECTOR == 0
            );
            for address in (piece.address..piece.end()).step_by(SECTOR as usize) {
                prop_assert!(
                    reported.insert(address),
                    "address {} freed twice in one insert",
                    address
                );
                prop_assert!(
                    self.freed.insert(address),
                    "address {} freed twice",
                    address
                );
            }
        }
        prop_assert_eq!(reported, expected_freed);
        Ok(())
    }
}

/// Compares everything the map answers with the model. `probes` drive the ranges and ops queried.
fn check(map: &ExtentMap, model: &Model, probes: &[u64]) -> Result<(), TestCaseError> {
    map.check_invariants();
    let extents = model.extents();
    prop_assert_eq!(map.iter().collect::<Vec<_>>(), extents.clone());
    prop_assert_eq!(map.extent_count(), extents.len());
    prop_assert_eq!(
        map.max_op(),
        extents.iter().map(|e| e.op).max().unwrap_or(0)
    );

    let sectors = model.sectors.len();
    let mut out = Vec::new();
    map.lookup(0, sectors as u64 * SECTOR, &mut out);
    prop_assert_eq!(&out, &model.mappings(0, sectors));
    for pair in probes.chunks(2) {
        let start = (pair[0] % sectors as u64) as usize;
        let length = 1 + (pair.get(1).copied().unwrap_or(7) % (sectors - start) as u64) as usize;
        out.clear();
        map.lookup(start as u64 * SECTOR, length as u64 * SECTOR, &mut out);
        prop_assert_eq!(&out, &model.mappings(start, start + length));
    }
    let op_max = map.max_op();
    for &probe in probes.iter().chain(&[0, op_max]) {
        let since = probe % (op_max + 2);
        let mut changed = Vec::new();
        map.changed_since(since, &mut changed);
        let expected: Vec<Extent> = extents.iter().filter(|e| e.op > since).copied().collect();
        prop_assert_eq!(changed, expected);
    }

    // Nothing leaks, nothing is both live and freed.
    let live = model.live_addresses();
    prop_assert!(live.is_disjoint(&model.freed));
    prop_assert_eq!(live.len() + model.freed.len(), model.inserted.len());
    Ok(())
}

#[derive(Clone, Debug)]
enum Step {
    /// A write of `sectors` at `start` (both wrapped to the volume), stored in `pieces` fragments that share
    /// one op (a write whose allocation came back fragmented), or zeroes.
    Write {
        start: u64,
        sectors: u64,
        pieces: u64,
        zero: bool,
    },
    /// Many small writes (one op each) at places drawn from `seed`.
    Burst {
        seed: u64,
        writes: u64,
        sectors_max: u64,
    },
    Snapshot,
    /// A write into snapshot `which` (wrapped) instead of the map.
    WriteSnapshot {
        which: usize,
        start: u64,
        sectors: u64,
    },
    DropSnapshot {
        which: usize,
    },
}

fn step(sectors: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..sectors, 1..sectors / 4, 1u64..4, any::<bool>())
            .prop_map(|(start, length, pieces, zero)| Step::Write { start, sectors: length, pieces, zero }),
        2 => (0..sectors, 1..sectors)
            .prop_map(|(start, length)| Step::Write { start, sectors: length, pieces: 1, zero: true }),
        2 => (any::<u64>(), 1u64..200, 1u64..8)
            .prop_map(|(seed, writes, sectors_max)| Step::Burst { seed, writes, sectors_max }),
        1 => Just(Step::Snapshot),
        1 => (any::<usize>(), 0..sectors, 1..sectors / 4)
            .prop_map(|(which, start, length)| Step::WriteSnapshot { which, start, sectors: length }),
        1 => any::<usize>().prop_map(|which| Step::DropSnapshot { which }),
    ]
}

/// Hands out data addresses that are never reused, with a gap after each so that two pieces never look
/// like one extent.
struct Addresses(u64);

impl Addresses {
    fn take(&mut self, sectors: u64) -> u64 {
        let address = self.0;
        self.0 += (sectors + 1) * SECTOR;
        address
    }
}

/// Inserts a write (possibly in fragments) into both the map and its model.
fn write(
    map: &mut ExtentMap,
    model: &mut Model,
    addresses: &mut Addresses,
    op: u64,
    (start, sectors, pieces, zero): (u64, u64, u64, bool),
) -> Result<(), TestCaseError> {
    let volume_sectors = model.sectors.len() as u64;
    let start = start % volume_sectors;
    let sectors = 1 + (sectors - 1) % (volume_sectors - start);
    let pieces = if zero { 1 } else { pieces.clamp(1, sectors) };
    let mut offset = start;
    for index in 0..pieces {
        let length = if index + 1 == pieces {
            start + sectors - offset
        } else {
            sectors / pieces
        };
        let location = if zero {
            Location::Zero
        } else {
            Location::Data(addresses.take(length))
        };
        let extent = Extent {
            offset: offset * SECTOR,
            length: length * SECTOR,
            op,
            location,
        };
        let mut freed = Vec::new();
        map.insert(extent, &mut freed);
        model.insert(extent, &freed)?;
        offset += length;
    }
    Ok(())
}

fn run_model(volume_sectors: u64, steps: Vec<Step>, probes: Vec<u64>) -> Result<(), TestCaseError> {
    let mut map = ExtentMap::new();
    let mut model = Model::new(volume_sectors as usize);
    let mut snapshots: Vec<(ExtentMap, Model)> = Vec::new();
    let mut addresses = Addresses(1 << 30);
    let mut op = 0;
    for (step_index, step) in steps.into_iter().enumerate() {
        match step {
            Step::Write {
                start,
                sectors,
                pieces,
                zero,
            } => {
                op += 1;
                write(
                    &mut map,
                    &mut model,
                    &mut addresses,
                    op,
                    (start, sectors, pieces, zero),
                )?;
            }
            Step::Burst {
                seed,
                writes,
                sectors_max,
            } => {
                let mut random = crate::sim_rng::Rng::new(seed);
                for _ in 0..writes {
                    op += 1;
                    let write_step = (
                        random.below(volume_sectors),
                        1 + random.below(sectors_max),
                        1,
                        random.below(8) == 0,
                    );
                    write(&mut map, &mut model, &mut addresses, op, write_step)?;
                }
            }
            Step::Snapshot => snapshots.push((map.snapshot(), model.clone())),
            Step::WriteSnapshot {
                which,
                start,
                sectors,
            } => {
                if snapshots.is_empty() {
                    continue;
                }
                op += 1;
                let count = snapshots.len();
                let (snapshot, snapshot_model) = &mut snapshots[which % count];
                write(
                    snapshot,
                    snapshot_model,
                    &mut addresses,
                    op,
                    (start, sectors, 1, false),
                )?;
            }
            Step::DropSnapshot { which } => {
                if !snapshots.is_empty() {
                    let count = snapshots.len();
                    snapshots.remove(which % count);
                }
            }
        }
        let probes_now: Vec<u64> = probes
            .iter()
            .map(|probe| probe.wrapping_add(step_index as u64 * 7919))
            .collect();
        check(&map, &model, &probes_now)?;
        for (snapshot, snapshot_model) in &snapshots {
            check(snapshot, snapshot_model, &probes_now[..2])?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A 128 KiB volume: overlaps everywhere, trees of one or two levels.
    #[test]
    fn extent_map_matches_model_small_volume(
        steps in proptest::collection::vec(step(256), 1..60),
        probes in proptest::collection::vec(any::<u64>(), 8),
    ) {
        run_model(256, steps, probes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A 2 MiB volume with bursts of small writes: trees of two and three levels, big trims that drop whole
    /// subtrees and merge across levels.
    #[test]
    fn extent_map_matches_model_large_volume(
        steps in proptest::collection::vec(step(4096), 1..40),
        probes in proptest::collection::vec(any::<u64>(), 8),
    ) {
        run_model(4096, steps, probes)?;
    }
}

/// A tree several levels deep, cut down by large trims at random places until little is left: every
/// rebalancing path (leaf and internal merges, redistributions, seam fix-ups, root shrinking) runs.
#[test]
fn deep_tree_survives_large_trims() {
    const VOLUME_SECTORS: u64 = 1 << 17;
    let mut random = crate::sim_rng::Rng::new(42);
    let mut map = ExtentMap::new();
    let mut model = Model::new(VOLUME_SECTORS as usize);
    let mut addresses = Addresses(1 << 40);
    let mut op = 0;
    let mut freed = Vec::new();
    // Single-sector writes at even sectors never touch each other: one extent each.
    while map.extent_count() < 40_000 {
        op += 1;
        let start = random.below(VOLUME_SECTORS / 2) * 2;
        let extent = data(start, 1, op, addresses.take(1) / SECTOR);
        freed.clear();
        map.insert(extent, &mut freed);
        model.insert(extent, &freed).expect("model agrees");
    }
    assert!(map.height() >= 3, "height {}", map.height());
    let snapshot = map.snapshot();
    let snapshot_model = model.clone();
    check(&map, &model, &[1, 2, 3, 4]).expect("model agrees");
    for trim_index in 0..1500u64 {
        if map.extent_count() < 64 {
            break;
        }
        op += 1;
        let start = random.below(VOLUME_SECTORS);
        let length_max = if random.below(4) == 0 {
            VOLUME_SECTORS / 8
        } else {
            256
        };
        let length = 1 + random.below((VOLUME_SECTORS - start).min(length_max));
        let trim = zero(start, length, op);
        freed.clear();
        map.insert(trim, &mut freed);
        model.insert(trim, &freed).expect("model agrees");
        if trim_index % 8 == 0 {
            map.check_invariants();
        }
        if trim_index % 128 == 0 {
            check(&map, &model, &[op, op * 3, op * 5, op * 7]).expect("model agrees");
        }
    }
    check(&map, &model, &[1, 2, 3, 4]).expect("model agrees");
    // Finish with one trim over everything, then one write over everything.
    op += 1;
    let all = zero(0, VOLUME_SECTORS, op);
    freed.clear();
    map.insert(all, &mut freed);
    model.insert(all, &freed).expect("model agrees");
    check(&map, &model, &[1, 2, 3, 4]).expect("model agrees");
    assert_eq!(map.extent_count(), 1);
    assert_eq!(map.height(), 0);
    check(&snapshot, &snapshot_model, &[5, 6, 7, 8]).expect("snapshot unchanged");
}
