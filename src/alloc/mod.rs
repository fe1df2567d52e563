//! The data-area allocator: which sectors of this peer's data area hold live data and which are free.
//!
//! Owns: the free space of `[0, capacity_bytes)`, kept as coalesced free runs in one tree (`runs`: in
//! address order, with the longest run below each inner entry), and the next-fit cursor that makes
//! consecutive writes land consecutively on disk.
//! Must never: hand out a byte that is already allocated, accept a free of a byte that is not allocated,
//! allocate part of a request when the whole does not fit, or touch the disk. It is not durable: what is
//! live is derived from the extent map on recovery (`mark_used`).
//!
//! Policy. An allocation is taken from the free run that contains the cursor (the end of the previous
//! allocation) when the rest of that run fits it: a stream of writes then lands back to back. Otherwise it
//! is taken from the front of the longest free run (the leftmost of equals), so that the following writes
//! have the longest contiguous stretch ahead of them. Only when no single run fits does a request come
//! back in several pieces, taken longest first (the fewest pieces possible). Every step is one or two
//! descents of the run tree: O(log runs) per piece.

mod runs;

use crate::config::SECTOR_SIZE;
use runs::{FreeRuns, Path};

/// A byte range of the data area: allocated to a write, or no longer referenced and ready to be freed.
/// Address and length are multiples of the sector size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub address: u64,
    pub length: u64,
}

impl Piece {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.address + self.length
    }
}

/// The data area has fewer free bytes than an allocation asked for. Nothing was allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("data area full: {requested_bytes} bytes requested, {free_bytes} bytes free")]
pub struct NoSpace {
    pub requested_bytes: u64,
    pub free_bytes: u64,
}

/// Free-space manager of one data area. See the module documentation for the policy.
#[derive(Debug, Clone)]
pub struct Allocator {
    capacity_bytes: u64,
    free_bytes: u64,
    /// Free runs, start -> length. Never empty runs, never two runs that touch (they are coalesced).
    runs: FreeRuns,
    /// End of the previous allocation: where the next one would continue it.
    cursor: u64,
}

impl Allocator {
    /// Manages `[0, capacity_bytes)` in sectors, all free.
    pub fn new(capacity_bytes: u64) -> Self {
        assert!(
            capacity_bytes.is_multiple_of(SECTOR_SIZE),
            "data area capacity {capacity_bytes} is not a whole number of sectors"
        );
        let mut allocator = Allocator {
            capacity_bytes,
            free_bytes: capacity_bytes,
            runs: FreeRuns::new(),
            cursor: 0,
        };
        if capacity_bytes > 0 {
            let path = allocator.runs.descend(0);
            allocator.runs.insert_at(&path, 0, capacity_bytes);
        }
        allocator
    }

    /// Allocates `length` bytes, appending the pieces to `out` (their lengths add up to exactly `length`).
    /// One piece whenever a single free run can hold the request; otherwise the fewest pieces possible.
    /// Fails, allocating nothing, when fewer than `length` bytes are free.
    pub fn allocate(&mut self, length: u64, out: &mut Vec<Piece>) -> Result<(), NoSpace> {
        assert!(
            length > 0 && length.is_multiple_of(SECTOR_SIZE),
            "allocation of {length} bytes is not a positive whole number of sectors"
        );
        if length > self.free_bytes {
            return Err(NoSpace {
                requested_bytes: length,
                free_bytes: self.free_bytes,
            });
        }

        // Continue the previous allocation when the run it ended in still has room.
        let path = self.runs.descend(self.cursor);
        if let Some((run_start, run_length)) = self.runs.at_or_before(&path)
            && run_start + run_length > self.cursor
            && run_start + run_length - self.cursor >= length
        {
            let address = self.cursor;
            self.take(&path, (run_start, run_length), address, length);
            out.push(Piece { address, length });
            return Ok(());
        }

        // Otherwise the front of the longest run; when even that is too small, take the longest runs
        // whole, one after the other, which yields the fewest pieces.
        let mut remaining = length;
        while remaining > 0 {
            let Some(((run_start, run_length), path)) = self.runs.longest() else {
                unreachable!("free_bytes counted {remaining} more bytes than the free runs hold");
            };
            let taken = run_length.min(remaining);
            self.take(&path, (run_start, run_length), run_start, taken);
            out.push(Piece {
                address: run_start,
                length: taken,
            });
            remaining -= taken;
        }
        Ok(())
    }

    /// Returns an allocated piece (or part of one) to the free space.
    pub fn free(&mut self, piece: Piece) {
        self.assert_piece_in_bounds(piece);
        let (start, end) = (piece.address, piece.end());
        let path = self.runs.descend(start);
        let before = self.runs.at_or_before(&path);
        let after = self.runs.after(&path);
        if let Some((before_start, before_length)) = before {
            assert!(
                before_start + before_length <= start,
                "free of {piece:?}, which overlaps the free run at {before_start}+{before_length}"
            );
        }
        if let Some((after_start, after_length)) = after {
            assert!(
                after_start >= end,
                "free of {piece:?}, which overlaps the free run at {after_start}+{after_length}"
            );
        }
        let joins_before =
            before.filter(|&(before_start, before_length)| before_start + before_length == start);
        let joins_after = after.filter(|&(after_start, _)| after_start == end);
        match (joins_before, joins_after) {
            (Some((before_start, before_length)), Some((after_start, after_length))) => {
                let length = before_length + piece.length + after_length;
                self.runs.replace_at_or_before(&path, before_start, length);
                self.runs.remove(after_start);
            }
            (Some((before_start, before_length)), None) => {
                self.runs
                    .replace_at_or_before(&path, before_start, before_length + piece.length);
            }
            (None, Some((_, after_length))) => {
                self.runs
                    .replace_after(&path, start, piece.length + after_length);
            }
            (None, None) => self.runs.insert_at(&path, start, piece.length),
        }
        self.free_bytes += piece.length;
        debug_assert!(self.free_bytes <= self.capacity_bytes);
    }

    /// Marks a free piece as used, for recovery: the allocator is rebuilt from the extent map.
    pub fn mark_used(&mut self, piece: Piece) {
        self.assert_piece_in_bounds(piece);
        let path = self.runs.descend(piece.address);
        let Some(run) = self
            .runs
            .at_or_before(&path)
            .filter(|&(start, length)| start + length >= piece.end())
        else {
            panic!("mark_used of {piece:?}, which is not entirely free");
        };
        self.take(&path, run, piece.address, piece.length);
    }

    /// Whether every byte of `piece` is free: lets recovery reject a damaged map (two extents sharing
    /// data) with an error before `mark_used` would assert.
    pub fn is_free(&self, piece: Piece) -> bool {
        self.assert_piece_in_bounds(piece);
        let path = self.runs.descend(piece.address);
        self.runs
            .at_or_before(&path)
            .is_some_and(|(start, length)| start + length >= piece.end())
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Carves `[address, address + length)` out of `run` (start, length), the run at or before the
    /// address `path` was made for.
    fn take(&mut self, path: &Path, run: (u64, u64), address: u64, length: u64) {
        let (run_start, run_length) = run;
        let (run_end, end) = (run_start + run_length, address + length);
        debug_assert!(run_start <= address && end <= run_end && length > 0);
        match (address > run_start, end < run_end) {
            (false, false) => self.runs.remove_at_or_before(path),
            (false, true) => self.runs.replace_at_or_before(path, end, run_end - end),
            (true, false) => self
                .runs
                .replace_at_or_before(path, run_start, address - run_start),
            (true, true) => {
                self.runs
                    .replace_at_or_before(path, run_start, address - run_start);
                self.runs.insert_at(path, end, run_end - end);
            }
        }
        self.free_bytes -= length;
        self.cursor = end;
    }

    fn assert_piece_in_bounds(&self, piece: Piece) {
        assert!(
            piece.length > 0
                && piece.address.is_multiple_of(SECTOR_SIZE)
                && piece.length.is_multiple_of(SECTOR_SIZE)
                && piece
                    .address
                    .checked_add(piece.length)
                    .is_some_and(|end| end <= self.capacity_bytes),
            "{piece:?} is not a sector-aligned piece of a {} byte data area",
            self.capacity_bytes
        );
    }

    /// Checks every internal invariant (tests only: it walks all runs).
    #[cfg(test)]
    fn check_invariants(&self) {
        self.runs.check_invariants();
        let mut previous_end = None;
        let mut free_bytes = 0;
        for (start, length) in self.runs.runs() {
            assert!(length > 0);
            if let Some(previous_end) = previous_end {
                assert!(start > previous_end, "runs touch or overlap at {start}");
            }
            previous_end = Some(start + length);
            free_bytes += length;
        }
        assert!(previous_end.is_none_or(|end| end <= self.capacity_bytes));
        assert_eq!(free_bytes, self.free_bytes);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECTOR: u64 = SECTOR_SIZE;

    #[test]
    fn consecutive_allocations_are_contiguous() {
        let mut allocator = Allocator::new(1 << 20);
        let mut pieces = Vec::new();
        for _ in 0..8 {
            allocator.allocate(8 * SECTOR, &mut pieces).expect("space");
        }
        for pair in pieces.windows(2) {
            assert_eq!(pair[0].end(), pair[1].address);
        }
        assert_eq!(allocator.free_bytes(), (1 << 20) - 64 * SECTOR);
    }

    #[test]
    fn freed_space_coalesces_and_is_reused() {
        let mut allocator = Allocator::new(16 * SECTOR);
        let mut pieces = Vec::new();
        allocator.allocate(16 * SECTOR, &mut pieces).expect("space");
        assert_eq!(
            allocator.allocate(SECTOR, &mut pieces),
            Err(NoSpace {
                requested_bytes: SECTOR,
                free_bytes: 0
            })
        );
        allocator.free(Piece {
            address: 4 * SECTOR,
            length: 2 * SECTOR,
        });
        allocator.free(Piece {
            address: 8 * SECTOR,
            length: 2 * SECTOR,
        });
        allocator.free(Piece {
            address: 6 * SECTOR,
            length: 2 * SECTOR,
        });
        allocator.check_invariants();
        assert_eq!(allocator.runs.len(), 1);
        let mut again = Vec::new();
        allocator.allocate(6 * SECTOR, &mut again).expect("space");
        assert_eq!(
            again,
            [Piece {
                address: 4 * SECTOR,
                length: 6 * SECTOR
            }]
        );
    }

    #[test]
    fn fragmented_space_yields_several_pieces_largest_first() {
        let mut allocator = Allocator::new(32 * SECTOR);
        let mut pieces = Vec::new();
        allocator.allocate(32 * SECTOR, &mut pieces).expect("space");
        for (address, length) in [(0, 2), (4, 3), (10, 1)] {
            allocator.free(Piece {
                address: address * SECTOR,
                length: length * SECTOR,
            });
        }
        let mut out = Vec::new();
        allocator.allocate(5 * SECTOR, &mut out).expect("space");
        assert_eq!(
            out,
            [
                Piece {
                    address: 4 * SECTOR,
                    length: 3 * SECTOR
                },
                Piece {
                    address: 0,
                    length: 2 * SECTOR
                },
            ]
        );
        assert_eq!(allocator.free_bytes(), SECTOR);
    }

    #[test]
    #[should_panic(expected = "overlaps the free run")]
    fn double_free_panics() {
        let mut allocator = Allocator::new(16 * SECTOR);
        let mut pieces = Vec::new();
        allocator.allocate(4 * SECTOR, &mut pieces).expect("space");
        allocator.free(pieces[0]);
        allocator.free(pieces[0]);
    }

    #[test]
    #[should_panic(expected = "not entirely free")]
    fn mark_used_of_used_space_panics() {
        let mut allocator = Allocator::new(16 * SECTOR);
        let piece = Piece {
            address: 2 * SECTOR,
            length: 4 * SECTOR,
        };
        allocator.mark_used(piece);
        allocator.mark_used(Piece {
            address: 5 * SECTOR,
            length: SECTOR,
        });
    }

    /// Sectors of the model data area.
    const MODEL_SECTORS: usize = 256;

    #[derive(Clone, Debug)]
    enum Step {
        Allocate {
            sectors: u64,
        },
        /// Frees part of a held piece: `held` picks the piece, `skip`/`sectors` the part (both wrapped).
        Free {
            held: usize,
            skip: u64,
            sectors: u64,
        },
        /// Marks used the free stretch starting at or after sector `start`, up to `sectors` long.
        MarkUsed {
            start: usize,
            sectors: u64,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u64..48).prop_map(|sectors| Step::Allocate { sectors }),
            1 => (200u64..300).prop_map(|sectors| Step::Allocate { sectors }),
            4 => (any::<usize>(), 0u64..64, 1u64..64)
                .prop_map(|(held, skip, sectors)| Step::Free { held, skip, sectors }),
            1 => (0..MODEL_SECTORS, 1u64..32).prop_map(|(start, sectors)| Step::MarkUsed { start, sectors }),
        ]
    }

    /// Lengths of the maximal free stretches of the model, largest first.
    fn free_stretches_largest_first(used: &[bool]) -> Vec<u64> {
        let mut stretches = Vec::new();
        let mut length = 0;
        for &sector_used in used {
            if sector_used {
                if length > 0 {
                    stretches.push(length);
                }
                length = 0;
            } else {
                length += 1;
            }
        }
        if length > 0 {
            stretches.push(length);
        }
        stretches.sort_unstable_by(|a, b| b.cmp(a));
        stretches
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn allocator_matches_model(steps in proptest::collection::vec(step(), 1..120)) {
            let mut allocator = Allocator::new(MODEL_SECTORS as u64 * SECTOR);
            let mut used = vec![false; MODEL_SECTORS];
            let mut held: Vec<Piece> = Vec::new();
            for step in steps {
                match step {
                    Step::Allocate { sectors } => {
                        let free_sectors = used.iter().filter(|&&u| !u).count() as u64;
                        let stretches = free_stretches_largest_first(&used);
                        let mut out = Vec::new();
                        let result = allocator.allocate(sectors * SECTOR, &mut out);
                        if sectors > free_sectors {
                            prop_assert!(result.is_err());
                            prop_assert!(out.is_empty());
                            continue;
                        }
                        prop_assert!(result.is_ok());
                        prop_assert_eq!(out.iter().map(|p| p.length).sum::<u64>(), sectors * SECTOR);
                        // The fewest pieces possible: as many as the largest stretches needed to cover it.
                        let mut covered = 0;
                        let fewest = stretches.iter().take_while(|&&s| { let more = covered < sectors; covered += s; more }).count();
                        prop_assert_eq!(out.len(), fewest);
                        for piece in &out {
                            prop_assert!(piece.length > 0 && piece.address % SECTOR == 0 && piece.length % SECTOR == 0);
                            for sector in piece.address / SECTOR..piece.end() / SECTOR {
                                prop_assert!(!used[sector as usize], "sector {} handed out twice", sector);
                                used[sector as usize] = true;
                            }
                        }
                        held.extend(out);
                    }
                    Step::Free { held: index, skip, sectors } => {
                        if held.is_empty() {
                            continue;
                        }
                        let piece = held.swap_remove(index % held.len());
                        let piece_sectors = piece.length / SECTOR;
                        let skip = skip % piece_sectors;
                        let sectors = 1 + (sectors - 1) % (piece_sectors - skip);
                        let part = Piece { address: piece.address + skip * SECTOR, length: sectors * SECTOR };
                        if skip > 0 {
                            held.push(Piece { address: piece.address, length: skip * SECTOR });
                        }
                        if part.end() < piece.end() {
                            held.push(Piece { address: part.end(), length: piece.end() - part.end() });
                        }
                        allocator.free(part);
                        for sector in part.address / SECTOR..part.end() / SECTOR {
                            used[sector as usize] = false;
                        }
                    }
                    Step::MarkUsed { start, sectors } => {
                        let probe = Piece { address: start as u64 * SECTOR, length: SECTOR };
                        prop_assert_eq!(allocator.is_free(probe), !used[start]);
                        let Some(first) = (start..MODEL_SECTORS).find(|&s| !used[s]) else { continue };
                        let count = (first..MODEL_SECTORS).take(sectors as usize).take_while(|&s| !used[s]).count();
                        let piece = Piece { address: first as u64 * SECTOR, length: count as u64 * SECTOR };
                        prop_assert!(allocator.is_free(piece));
                        allocator.mark_used(piece);
                        used[first..first + count].iter_mut().for_each(|u| *u = true);
                        held.push(piece);
                    }
                }
                allocator.check_invariants();
                let free_sectors = used.iter().filter(|&&u| !u).count() as u64;
                prop_assert_eq!(allocator.free_bytes(), free_sectors * SECTOR);
                prop_assert_eq!(allocator.capacity_bytes(), MODEL_SECTORS as u64 * SECTOR);
            }
        }
    }
}
