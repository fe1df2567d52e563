//! Crash recovery: from the journal ring back to the committed state.
//!
//! Owns: the rules that decide which journal blocks form the log, which checkpoint is the base, and up
//! to which op notes are committed. Recovery = load the newest complete checkpoint + replay the notes
//! after it, in op order, up to the commit watermark. Notes above the watermark are dropped (never
//! exposed); damage to anything that was once durable is an error naming the block, never repaired.
//! Must never: guess. Every "the log ends here" decision is justified by the `durable_before` fields
//! (a torn tail is only possible for blocks no later block vouched for).

use std::io;

use crate::btree::{Extent, ExtentMap, Location};
use crate::journal::format::{
    self, BlockHeader, BlockKind, CheckpointDone, JOURNAL_BLOCK_BYTES, LOCATION_ZERO, NoteKind,
    NoteRecord,
};
use crate::journal::superblock::Superblock;

/// Journal blocks a writer may have in flight (sealed, not known durable) at once; recovery looks this
/// far past a torn block for proof that it had been durable. A writer may keep fewer (a small ring
/// allows a quarter of itself). Looking further than a writer went is safe: only a block with exactly
/// the seq looked for, of the chain's incarnation or a later one, counts as proof, and any such block
/// was written after the torn one was known durable. (Format version 2 stores written with a limit
/// of 64 recover the same.) Write-back syncs when half of its limit is unsynced, because a sync costs
/// about as much as the data written since the last one (the device writes back its cache) and
/// stalls the writes behind it: fewer, larger syncs are cheaper. The writer keeps only the blocks'
/// positions once they are written, not their bytes.
pub const JOURNAL_BLOCKS_IN_FLIGHT_MAX: u64 = 16384;
/// Bytes read from the device per request while scanning.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("IO error at byte {address}: {source}")]
    Io { address: u64, source: io::Error },
    #[error(
        "journal block seq {seq} is damaged but a later durable block proves it was written: corruption"
    )]
    DamagedDurableBlock { seq: u64 },
    #[error("checkpoint {checkpoint_id} is incomplete or damaged: {reason}")]
    Checkpoint {
        checkpoint_id: u64,
        reason: &'static str,
    },
    #[error("journal block seq {seq}: {reason}")]
    Malformed { seq: u64, reason: &'static str },
    #[error("committed op {op} has a damaged or missing note: corruption")]
    DamagedCommittedNote { op: u64 },
}

/// The committed state and where the journal continues.
pub struct Recovered {
    pub map: ExtentMap,
    pub committed_op: u64,
    /// Seq of the next block to write.
    pub next_seq: u64,
    /// Blocks before this seq may be overwritten.
    pub live_from_seq: u64,
    /// Incarnation for blocks written from now on: greater than any block in the ring.
    pub incarnation: u32,
    pub checkpoint_id: u64,
    /// Durable notes above the watermark that were dropped (never acknowledged).
    pub notes_dropped: u64,
    pub blocks_replayed: u64,
}

impl Recovered {
    /// The state of a store that was just created.
    pub fn empty() -> Recovered {
        Recovered {
            map: ExtentMap::new(),
            committed_op: 0,
            next_seq: 0,
            live_from_seq: 0,
            incarnation: 1,
            checkpoint_id: 0,
            notes_dropped: 0,
            blocks_replayed: 0,
        }
    }
}

#[derive(Clone, Copy)]
struct Summary {
    header: BlockHeader,
}

/// Reads `buffer.len()` bytes at byte `address` of the backing store.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> io::Result<()> + 'a;

pub fn recover(
    superblock: &Superblock,
    read_at: &mut ReadAt<'_>,
) -> Result<Recovered, RecoveryError> {
    let ring_blocks = superblock.journal_blocks();
    let volume_id = superblock.volume_id;
    let mut read = |address: u64, buffer: &mut [u8]| {
        read_at(address, buffer).map_err(|source| RecoveryError::Io { address, source })
    };

    // Pass 1: which ring slots hold a valid block, and the checkpoint-done records.
    let mut summaries: Vec<Option<Summary>> = vec![None; ring_blocks as usize];
    let mut dones: Vec<(u64, CheckpointDone)> = Vec::new();
    let mut max_incarnation = 0u32;
    let mut chunk = vec![0u8; SCAN_CHUNK_BYTES];
    let blocks_per_chunk = (SCAN_CHUNK_BYTES / JOURNAL_BLOCK_BYTES) as u64;
    let mut index = 0u64;
    while index < ring_blocks {
        let count = blocks_per_chunk.min(ring_blocks - index);
        let bytes = &mut chunk[..(count as usize) * JOURNAL_BLOCK_BYTES];
        read(
            superblock.journal_offset + index * JOURNAL_BLOCK_BYTES as u64,
            bytes,
        )?;
        for (offset, block) in bytes.chunks_exact(JOURNAL_BLOCK_BYTES).enumerate() {
            let slot = index + offset as u64;
            let Some(header) = format::open_block(block, volume_id) else {
                continue;
            };
            if header.seq % ring_blocks != slot {
                continue; // a block can only live in its own slot; anything else is not ours
            }
            max_incarnation = max_incarnation.max(header.incarnation);
            if header.kind == BlockKind::CheckpointDone {
                dones.push((header.seq, format::get_checkpoint_done(block)));
            }
            summaries[slot as usize] = Some(Summary { header });
        }
        index += count;
    }

    // Pass 2: the chain of consecutive blocks from the replay start.
    let slot_of = |seq: u64| (seq % ring_blocks) as usize;
    // One past the last block of the chain of consecutive blocks from `start_seq`, and the
    // incarnation of that last block; and whether a block past that end says the end block was durable
    // (then it is damaged, not torn).
    let chain_end = |start_seq: u64| {
        let mut end_seq = start_seq;
        let mut chain_incarnation = 0u32;
        while end_seq - start_seq < ring_blocks {
            let Some(summary) = summaries[slot_of(end_seq)] else {
                break;
            };
            if summary.header.seq != end_seq || summary.header.incarnation < chain_incarnation {
                break;
            }
            chain_incarnation = summary.header.incarnation;
            end_seq += 1;
        }
        (end_seq, chain_incarnation)
    };
    let vouched_past_end = |end_seq: u64, chain_incarnation: u32| {
        (end_seq + 1..=end_seq + JOURNAL_BLOCKS_IN_FLIGHT_MAX.min(ring_blocks)).any(|seq| {
            summaries[slot_of(seq)].is_some_and(|summary| {
                summary.header.seq == seq
                    && summary.header.incarnation >= chain_incarnation
                    && summary.header.durable_before > end_seq
            })
        })
    };
    // The newest checkpoint whose done record is in the chain from its own replay start. A done record
    // past the end of that chain (a block before it is missing, and no later header says it was
    // durable) was never known durable by its writer, which therefore still keeps the previous
    // checkpoint's blocks; and the next incarnation, which continues the log at the chain's end, may
    // overwrite it.
    dones.sort_unstable_by_key(|&(seq, _)| std::cmp::Reverse(seq));
    let mut newest_done = None;
    for &(seq, done) in &dones {
        let (end_seq, chain_incarnation) = chain_end(done.replay_from_seq);
        if seq >= done.replay_from_seq && seq < end_seq {
            newest_done = Some(done);
            break;
        }
        if vouched_past_end(end_seq, chain_incarnation) {
            return Err(RecoveryError::DamagedDurableBlock { seq: end_seq });
        }
    }
    let wrapped = summaries
        .iter()
        .flatten()
        .any(|summary| summary.header.seq >= ring_blocks);
    if newest_done.is_none() && wrapped {
        // Blocks from seq 0 were overwritten, which the writer does only after a durable checkpoint.
        return Err(RecoveryError::Checkpoint {
            checkpoint_id: 0,
            reason: "the journal wrapped around but no checkpoint is complete",
        });
    }
    let (start_seq, checkpoint) = match newest_done {
        Some(done) => (done.replay_from_seq, Some(done)),
        None => (0, None),
    };
    let mut end_seq = start_seq;
    let mut chain_incarnation = 0u32;
    let mut durable_before = start_seq;
    let mut chain: Vec<BlockHeader> = Vec::new();
    while end_seq - start_seq < ring_blocks {
        let Some(summary) = summaries[slot_of(end_seq)] else {
            break;
        };
        if summary.header.seq != end_seq || summary.header.incarnation < chain_incarnation {
            break;
        }
        chain_incarnation = summary.header.incarnation;
        durable_before = durable_before.max(summary.header.durable_before);
        chain.push(summary.header);
        end_seq += 1;
    }
    // Notes of an incarnation above the watermark a later incarnation resumed from were dropped by that
    // recovery; their op numbers were reused. `void_above[i]`: the lowest such watermark after block i.
    let mut void_above = vec![u64::MAX; chain.len()];
    let (mut lower_bound, mut group_incarnation, mut group_resume) = (u64::MAX, u32::MAX, u64::MAX);
    for (index, header) in chain.iter().enumerate().rev() {
        if header.incarnation != group_incarnation {
            lower_bound = lower_bound.min(group_resume);
            group_incarnation = header.incarnation;
            group_resume = u64::MAX;
        }
        group_resume = group_resume.min(header.resume_op);
        void_above[index] = lower_bound;
    }
    let commit_through = chain
        .iter()
        .zip(&void_above)
        .map(|(header, &void)| header.commit_through.min(void))
        .max()
        .unwrap_or(0);
    // A block past the end that vouches for the end block means the end block was durable: damage.
    // While the end block was not durable the writer sealed blocks up to `end_seq + IN_FLIGHT_MAX - 1`;
    // the first that can vouch for it may be the next one.
    for seq in end_seq + 1..=end_seq + JOURNAL_BLOCKS_IN_FLIGHT_MAX.min(ring_blocks) {
        if let Some(summary) = summaries[slot_of(seq)]
            && summary.header.seq == seq
            && summary.header.incarnation >= chain_incarnation
            && summary.header.durable_before > end_seq
        {
            return Err(RecoveryError::DamagedDurableBlock { seq: end_seq });
        }
    }
    if durable_before > end_seq {
        return Err(RecoveryError::DamagedDurableBlock { seq: end_seq });
    }

    // Pass 3: load the checkpoint, then replay notes after it.
    let mut map = ExtentMap::new();
    let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
    let base_op = match checkpoint {
        Some(done) => {
            let damaged = |reason| RecoveryError::Checkpoint {
                checkpoint_id: done.checkpoint_id,
                reason,
            };
            if !(start_seq <= done.first_seq
                && done.first_seq <= done.end_seq
                && done.end_seq <= end_seq)
            {
                return Err(damaged("its blocks are not all in the journal"));
            }
            let mut crc = 0u32;
            let mut count = 0u64;
            let mut freed = Vec::new();
            for seq in done.first_seq..done.end_seq {
                read_block(&mut read, superblock, seq, &mut block)?;
                let header = format::open_block(&block, volume_id)
                    .ok_or(damaged("a block changed while reading"))?;
                if header.kind != BlockKind::CheckpointExtents
                    || header.checkpoint_id != done.checkpoint_id
                {
                    continue;
                }
                crc = crc32c::crc32c_append(
                    crc,
                    format::extent_bytes(&block, usize::from(header.count)),
                );
                for record_index in 0..usize::from(header.count) {
                    let record = format::get_extent(&block, record_index);
                    let location = if record.location == LOCATION_ZERO {
                        Location::Zero
                    } else {
                        Location::Data(record.location)
                    };
                    let valid = record.length > 0
                        && record.offset.is_multiple_of(512)
                        && record.length.is_multiple_of(512)
                        && record
                            .offset
                            .checked_add(record.length)
                            .is_some_and(|end| end <= superblock.volume_size)
                        && (location == Location::Zero
                            || record.location.is_multiple_of(512)
                                && record
                                    .location
                                    .checked_add(record.length)
                                    .is_some_and(|end| end <= superblock.data_bytes));
                    if !valid || record.op > done.op {
                        return Err(damaged("an extent record is out of range"));
                    }
                    map.insert(
                        Extent {
                            offset: record.offset,
                            length: record.length,
                            op: record.op,
                            location,
                        },
                        &mut freed,
                    );
                    if !freed.is_empty() {
                        return Err(damaged("extent records overlap"));
                    }
                    count += 1;
                }
            }
            if count != done.extent_count || crc != done.extents_crc {
                return Err(damaged("extent count or checksum mismatch"));
            }
            done.op
        }
        None => 0,
    };

    let mut committed_op = base_op;
    let mut notes_dropped = 0u64;
    // The op being assembled, with the block seq of each record: a host or applied note is one
    // record per data piece; a catch-up op is one or more notes of that op, complete only when a
    // record of another op follows (or the log ends: its op is then committed only if a header
    // recorded it, which the writer does only once the op is complete).
    let mut unit: Vec<(NoteRecord, u64)> = Vec::new();
    // Records of the unit's last note seen so far.
    let mut note_pieces = 0usize;
    let mut stopped = false;
    // The op whose records stopped the replay (above the watermark, or damaged): no op between the
    // last one replayed and it is in the log (catch-up skips ops).
    let mut stopped_at: Option<u64> = None;
    let mut data = Vec::new();
    let mut replay = Replay {
        superblock,
        commit_through,
        durable_before,
        map: &mut map,
        freed: Vec::new(),
        data: &mut data,
    };
    for seq in start_seq..end_seq {
        if summaries[slot_of(seq)].is_some_and(|summary| summary.header.kind != BlockKind::Notes) {
            continue;
        }
        read_block(&mut read, superblock, seq, &mut block)?;
        let header = format::open_block(&block, volume_id).ok_or(RecoveryError::Malformed {
            seq,
            reason: "block changed between scans",
        })?;
        for record_index in 0..usize::from(header.count) {
            let note = format::get_note(&block, record_index).ok_or(RecoveryError::Malformed {
                seq,
                reason: "malformed note record",
            })?;
            if note.op <= base_op || note.op > void_above[(seq - start_seq) as usize] {
                continue; // in the checkpoint already, or void
            }
            if stopped {
                notes_dropped += 1;
                continue;
            }
            let out_of_order = RecoveryError::Malformed {
                seq,
                reason: "notes out of op order",
            };
            let in_note = unit
                .last()
                .is_some_and(|(last, _)| note_pieces < usize::from(last.piece_count));
            if in_note {
                let (last, _) = unit.last().expect("in a note");
                if note.op != last.op
                    || note.catch_up != last.catch_up
                    || note.piece_count != last.piece_count
                    || usize::from(note.piece_index) != note_pieces
                {
                    return Err(out_of_order);
                }
            } else if unit
                .first()
                .is_some_and(|(first, _)| first.catch_up && note.catch_up && note.op == first.op)
            {
                // Another note of the same catch-up op.
                if note.piece_index != 0 {
                    return Err(out_of_order);
                }
                note_pieces = 0;
            } else {
                // Another op: the one assembled (a catch-up op) is complete.
                if !unit.is_empty() {
                    match replay.commit(&mut unit, &mut read)? {
                        Some(op) => committed_op = op,
                        None => {
                            stopped = true;
                            stopped_at = unit.first().map(|(first, _)| first.op);
                            notes_dropped += 1;
                            continue;
                        }
                    }
                }
                // Only catch-up skips ops: the ops in between are not part of this copy's history.
                let in_order = if note.catch_up {
                    note.op > committed_op
                } else {
                    note.op == committed_op + 1
                };
                if !in_order || note.piece_index != 0 {
                    return Err(out_of_order);
                }
                note_pieces = 0;
            }
            let in_volume = note
                .offset
                .checked_add(note.length)
                .is_some_and(|end| end <= superblock.volume_size);
            let in_data = note.kind == NoteKind::Zero
                || note
                    .location
                    .checked_add(note.length)
                    .is_some_and(|end| end <= superblock.data_bytes);
            if !in_volume || !in_data {
                return Err(RecoveryError::Malformed {
                    seq,
                    reason: "note out of range",
                });
            }
            unit.push((note, seq));
            note_pieces += 1;
            if !note.catch_up && note_pieces == usize::from(note.piece_count) {
                match replay.commit(&mut unit, &mut read)? {
                    Some(op) => committed_op = op,
                    None => {
                        stopped = true;
                        stopped_at = Some(note.op);
                    }
                }
            }
        }
    }
    // A catch-up op at the end of the log, whole: committed if a header says so.
    let whole = unit
        .last()
        .is_some_and(|(last, _)| last.catch_up && note_pieces == usize::from(last.piece_count));
    if !stopped
        && whole
        && let Some(op) = replay.commit(&mut unit, &mut read)?
    {
        committed_op = op;
    }
    if let Some((first, _)) = unit.first() {
        stopped_at.get_or_insert(first.op);
    }
    notes_dropped += unit.len() as u64;
    // A watermark the log vouches for (written in a block known durable) must be reached.
    let durable_commit = (start_seq..durable_before.min(end_seq))
        .map(|seq| {
            let index = (seq - start_seq) as usize;
            chain[index].commit_through.min(void_above[index])
        })
        .max()
        .unwrap_or(0);
    // (Catch-up may have skipped it: then the first op not replayed is above it.)
    let skipped = stopped_at.is_some_and(|op| op > durable_commit);
    if committed_op < base_op || committed_op < durable_commit && !skipped {
        return Err(RecoveryError::DamagedCommittedNote {
            op: committed_op + 1,
        });
    }
    Ok(Recovered {
        map,
        committed_op,
        next_seq: end_seq,
        live_from_seq: start_seq,
        incarnation: max_incarnation + 1,
        checkpoint_id: checkpoint.map_or(0, |done| done.checkpoint_id),
        notes_dropped,
        blocks_replayed: end_seq - start_seq,
    })
}

/// Replays one op's records into the map, if it is committed and its data intact.
struct Replay<'a> {
    superblock: &'a Superblock,
    commit_through: u64,
    durable_before: u64,
    map: &'a mut ExtentMap,
    freed: Vec<crate::alloc::Piece>,
    data: &'a mut Vec<u8>,
}

impl Replay<'_> {
    /// Inserts the op of `unit` (emptied) into the map and returns it, or `None` (the replay stops
    /// there) when it is above the commit watermark or a piece not known durable fails its data
    /// checksum (then the records are counted as dropped by the caller: `unit` is left as it was).
    fn commit(
        &mut self,
        unit: &mut Vec<(NoteRecord, u64)>,
        read: &mut impl FnMut(u64, &mut [u8]) -> Result<(), RecoveryError>,
    ) -> Result<Option<u64>, RecoveryError> {
        let op = unit.first().expect("an op to commit").0.op;
        let committed = op <= self.commit_through;
        let known_durable = unit.iter().all(|(_, seq)| *seq < self.durable_before);
        let mut intact = true;
        if committed && !known_durable {
            for (piece, _) in unit.iter() {
                if piece.kind == NoteKind::Write {
                    self.data.resize(piece.length as usize, 0);
                    read(self.superblock.data_offset + piece.location, self.data)?;
                    intact &= crc32c::crc32c(self.data) == piece.data_crc;
                }
            }
        }
        if !committed || !intact {
            return Ok(None);
        }
        for (piece, _) in unit.drain(..) {
            if piece.length == 0 {
                continue; // a catch-up jump: no extent
            }
            let location = if piece.kind == NoteKind::Zero {
                Location::Zero
            } else {
                Location::Data(piece.location)
            };
            self.map.insert(
                Extent {
                    offset: piece.offset,
                    length: piece.length,
                    op,
                    location,
                },
                &mut self.freed,
            );
        }
        self.freed.clear();
        Ok(Some(op))
    }
}

fn read_block(
    read: &mut impl FnMut(u64, &mut [u8]) -> Result<(), RecoveryError>,
    superblock: &Superblock,
    seq: u64,
    block: &mut [u8],
) -> Result<(), RecoveryError> {
    let slot = seq % superblock.journal_blocks();
    read(
        superblock.journal_offset + slot * JOURNAL_BLOCK_BYTES as u64,
        block,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::{ExtentRecord, NoteRecord};

    const VOLUME_ID: u64 = 77;
    const RING_BLOCKS: u64 = 64;

    fn superblock() -> Superblock {
        Superblock::with_regions(VOLUME_ID, "v", 1 << 20, RING_BLOCKS, 2 << 20)
    }

    fn header(seq: u64, kind: BlockKind, count: u16) -> BlockHeader {
        BlockHeader {
            volume_id: VOLUME_ID,
            seq,
            durable_before: 0,
            commit_through: 0,
            incarnation: 0,
            kind,
            count,
            checkpoint_id: 1,
            resume_op: 0,
        }
    }

    /// Recovers a store whose journal ring holds `blocks` (by seq) and whose data area reads as zeros.
    fn recover_ring(blocks: &[(u64, Vec<u8>)]) -> Result<Recovered, RecoveryError> {
        let superblock = superblock();
        let mut ring = vec![0u8; (RING_BLOCKS as usize) * JOURNAL_BLOCK_BYTES];
        for (seq, block) in blocks {
            let at = (seq % RING_BLOCKS) as usize * JOURNAL_BLOCK_BYTES;
            ring[at..at + JOURNAL_BLOCK_BYTES].copy_from_slice(block);
        }
        let journal =
            superblock.journal_offset..superblock.journal_offset + superblock.journal_bytes;
        recover(&superblock, &mut |address: u64, buffer: &mut [u8]| {
            buffer.fill(0);
            if journal.contains(&address) {
                let at = (address - journal.start) as usize;
                let len = buffer.len().min(ring.len() - at);
                buffer[..len].copy_from_slice(&ring[at..at + len]);
            }
            Ok(())
        })
    }

    fn checkpoint_with(extent: ExtentRecord) -> Vec<(u64, Vec<u8>)> {
        let mut extents = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_extent(&mut extents, 0, &extent);
        let crc = crc32c::crc32c(format::extent_bytes(&extents, 1));
        format::seal_block(&mut extents, &header(0, BlockKind::CheckpointExtents, 1));
        let mut done = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_checkpoint_done(
            &mut done,
            &CheckpointDone {
                checkpoint_id: 1,
                op: 5,
                first_seq: 0,
                end_seq: 1,
                extent_count: 1,
                extents_crc: crc,
                replay_from_seq: 0,
            },
        );
        format::seal_block(&mut done, &header(1, BlockKind::CheckpointDone, 1));
        vec![(0, extents), (1, done)]
    }

    fn notes_with(note: NoteRecord) -> Vec<(u64, Vec<u8>)> {
        let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_note(&mut block, 0, &note);
        let mut header = header(0, BlockKind::Notes, 1);
        header.commit_through = note.op;
        format::seal_block(&mut block, &header);
        vec![(0, block)]
    }

    #[test]
    fn a_well_formed_checkpoint_and_note_recover() {
        let extent = ExtentRecord {
            offset: 4096,
            length: 4096,
            op: 5,
            location: 8192,
        };
        let recovered = recover_ring(&checkpoint_with(extent)).expect("recovers");
        assert_eq!(recovered.committed_op, 5);
        assert_eq!(recovered.map.extent_count(), 1);

        let note = NoteRecord {
            op: 1,
            epoch: 0,
            offset: 0,
            length: 4096,
            location: 4096,
            data_crc: crc32c::crc32c(&[0u8; 4096]),
            kind: NoteKind::Write,
            piece_index: 0,
            piece_count: 1,
            catch_up: false,
        };
        let recovered = recover_ring(&notes_with(note)).expect("recovers");
        assert_eq!(recovered.committed_op, 1);
    }

    /// A checksummed block (a writer bug, a forged store) whose data location is not sector-aligned
    /// is refused with an error, not a panic in the extent map.
    #[test]
    fn misaligned_data_locations_are_refused() {
        let extent = ExtentRecord {
            offset: 4096,
            length: 4096,
            op: 5,
            location: 8193,
        };
        assert!(matches!(
            recover_ring(&checkpoint_with(extent)),
            Err(RecoveryError::Checkpoint {
                checkpoint_id: 1,
                ..
            })
        ));

        let note = NoteRecord {
            op: 1,
            epoch: 0,
            offset: 0,
            length: 4096,
            location: 4097,
            data_crc: crc32c::crc32c(&[0u8; 4096]),
            kind: NoteKind::Write,
            piece_index: 0,
            piece_count: 1,
            catch_up: false,
        };
        assert!(matches!(
            recover_ring(&notes_with(note)),
            Err(RecoveryError::Malformed { seq: 0, .. })
        ));
    }
}
