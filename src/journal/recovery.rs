//! Crash recovery: from the journal ring back to the committed state.
//!
//! Owns: the rules that decide which journal blocks form the log, which checkpoint is the base, and up
//! to which op notes are committed. Recovery = load the newest complete checkpoint + replay the notes
//! after it, in op order, up to the commit watermark. Notes above the watermark are dropped (never
//! exposed); damage to anything that was once durable is an error naming the block, never repaired.
//! Must never: guess. Every "the log ends here" decision is justified by the `durable_before` fields
//! (a torn tail is only possible for blocks no later block vouched for).

use std::io;

use crate::btree::{Extent, ExtentMap, Location, Mapping};
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
/// Largest seq a block may carry (far beyond any writer's): seq arithmetic over a ring's worth of
/// blocks past it cannot overflow.
const SEQ_MAX: u64 = u64::MAX / 4;
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
    /// Copies to make (then make durable) before the copy writes anything: see `HomeCopy`.
    pub home_copies: Vec<HomeCopy>,
}

impl Recovered {
    /// Prepares the store for the recovered copy; the caller then makes it durable before the copy
    /// writes anything. Makes the `home_copies` (until then the journal still holds the data), and
    /// erases the slot of block `next_seq`: it may hold a torn block of the crashed incarnation, whose
    /// missing sectors a torn write of the new incarnation's first block could complete (sectors of
    /// zeros are alike in both), bringing back the notes this recovery dropped, and the blocks after
    /// them.
    pub fn prepare_store(
        &self,
        superblock: &Superblock,
        read_at: &mut ReadAt<'_>,
        write_at: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buffer = Vec::new();
        for copy in &self.home_copies {
            buffer.resize(copy.length as usize, 0);
            read_at(copy.from, &mut buffer)?;
            write_at(copy.to, &buffer)?;
        }
        // Never a slot of the log itself (a log filling the whole ring leaves the copy no room anyway).
        if self.next_seq - self.live_from_seq >= superblock.journal_blocks() {
            return Ok(());
        }
        let slot = self.next_seq % superblock.journal_blocks();
        write_at(
            superblock.journal_offset + slot * JOURNAL_BLOCK_BYTES as u64,
            &[0u8; JOURNAL_BLOCK_BYTES],
        )
    }

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
            home_copies: Vec::new(),
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
            if header.seq % ring_blocks != slot
                || slot + u64::from(header.data_slots) >= ring_blocks
                || header.seq > SEQ_MAX
            {
                // A block can only live in its own slot, and its inline data never wraps; no writer
                // gets near the end of the seq space (seq arithmetic below cannot overflow):
                // anything else is not ours.
                continue;
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
    // Whether the block at `end_seq` continues the chain from `start_seq`: in its slot, of the chain's
    // incarnation or a later one, and with its data slots inside one ring from the start.
    let continues = |start_seq: u64, end_seq: u64, chain_incarnation: u32| {
        summaries[slot_of(end_seq)].filter(|summary| {
            summary.header.seq == end_seq
                && summary.header.incarnation >= chain_incarnation
                && end_seq + 1 + u64::from(summary.header.data_slots) - start_seq <= ring_blocks
        })
    };
    // One past the last block of the chain of consecutive blocks from `start_seq`, the incarnation
    // of that last block, and whether block `target` is one of the chain's blocks (not one of its
    // inline notes' data slots, which may hold anything).
    let chain_end = |start_seq: u64, target: u64| {
        let mut end_seq = start_seq;
        let mut chain_incarnation = 0u32;
        let mut has_target = false;
        while let Some(summary) = continues(start_seq, end_seq, chain_incarnation) {
            has_target |= end_seq == target;
            chain_incarnation = summary.header.incarnation;
            end_seq += 1 + u64::from(summary.header.data_slots);
        }
        (end_seq, chain_incarnation, has_target)
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
        let (end_seq, chain_incarnation, has_done) = chain_end(done.replay_from_seq, seq);
        if has_done {
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
    // One header per seq: an inline note's data slots repeat its block's header (they were written
    // with it), and are marked in `is_data`.
    let mut chain: Vec<BlockHeader> = Vec::new();
    let mut is_data: Vec<bool> = Vec::new();
    while let Some(summary) = continues(start_seq, end_seq, chain_incarnation) {
        chain_incarnation = summary.header.incarnation;
        durable_before = durable_before.max(summary.header.durable_before);
        chain.push(summary.header);
        is_data.push(false);
        for _ in 0..summary.header.data_slots {
            chain.push(summary.header);
            is_data.push(true);
        }
        end_seq += 1 + u64::from(summary.header.data_slots);
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
            // The writer emits extents in volume order, never overlapping: anything else is damage
            // (and the extent map must never see an insert older than what it overlaps).
            let mut records_end = 0u64;
            for seq in done.first_seq..done.end_seq {
                if is_data[(seq - start_seq) as usize] {
                    continue;
                }
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
                    if record.offset < records_end {
                        return Err(damaged("extent records overlap or are out of order"));
                    }
                    records_end = record.offset + record.length;
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
    // Notes of the op being gathered: (record, seq of its block, inline data slots after it).
    let mut unit: Vec<(NoteRecord, u64, u8)> = Vec::new();
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
        inline_notes: Vec::new(),
    };
    for seq in start_seq..end_seq {
        if is_data[(seq - start_seq) as usize] {
            continue;
        }
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
                .is_some_and(|(last, ..)| note_pieces < usize::from(last.piece_count));
            if in_note {
                let (last, ..) = unit.last().expect("in a note");
                if note.op != last.op
                    || note.catch_up != last.catch_up
                    || note.piece_count != last.piece_count
                    || usize::from(note.piece_index) != note_pieces
                {
                    return Err(out_of_order);
                }
            } else if unit
                .first()
                .is_some_and(|(first, ..)| first.catch_up && note.catch_up && note.op == first.op)
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
                            stopped_at = unit.first().map(|(first, ..)| first.op);
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
            if header.data_slots > 0
                && (note.kind != NoteKind::Write
                    || note.catch_up
                    || note.piece_count != 1
                    || note.length.div_ceil(JOURNAL_BLOCK_BYTES as u64)
                        != u64::from(header.data_slots))
            {
                return Err(RecoveryError::Malformed {
                    seq,
                    reason: "inline note does not match its data slots",
                });
            }
            unit.push((note, seq, header.data_slots));
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
        .is_some_and(|(last, ..)| last.catch_up && note_pieces == usize::from(last.piece_count));
    if !stopped
        && whole
        && let Some(op) = replay.commit(&mut unit, &mut read)?
    {
        committed_op = op;
    }
    if let Some((first, ..)) = unit.first() {
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
    // Only what the map still points to: space of an inline note's overwritten parts may hold
    // newer data already (it was freed and reused once the overwrite was vouched for).
    let inline_notes = std::mem::take(&mut replay.inline_notes);
    let mut home_copies = Vec::new();
    let mut mappings = Vec::new();
    for inline in &inline_notes {
        mappings.clear();
        map.lookup(inline.offset, inline.length, &mut mappings);
        for mapping in &mappings {
            if let Mapping::Mapped(Extent {
                offset,
                length,
                op,
                location: Location::Data(address),
            }) = *mapping
                && op == inline.op
            {
                let delta = offset - inline.offset;
                if address != inline.home + delta {
                    // Not reachable from any journal (an inline note's op is its own), but a
                    // copy to the wrong place would destroy data: refuse instead.
                    return Err(RecoveryError::DamagedCommittedNote { op });
                }
                home_copies.push(HomeCopy {
                    from: inline.data_address + delta,
                    to: superblock.data_offset + address,
                    length,
                });
            }
        }
    }
    Ok(Recovered {
        map,
        home_copies,
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
    /// Inline notes replayed, in op order: their data is copied home once the map is complete.
    inline_notes: Vec<InlineNote>,
}

/// A replayed note whose data is in the journal (`BlockHeader::data_slots`).
struct InlineNote {
    op: u64,
    offset: u64,
    length: u64,
    /// Its data-area address.
    home: u64,
    /// Where its data is in the store (the slot after its block).
    data_address: u64,
}

/// Store address of the data of the inline note in block `seq` (the writer never wraps it).
fn inline_data_address(superblock: &Superblock, seq: u64) -> u64 {
    let slot = seq % superblock.journal_blocks() + 1;
    superblock.journal_offset + slot * JOURNAL_BLOCK_BYTES as u64
}

/// Data to copy from the journal to the data area before the recovered copy writes anything: the
/// still-mapped parts of the inline notes replayed (the writer may not have copied them yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HomeCopy {
    /// Store addresses.
    pub from: u64,
    pub to: u64,
    pub length: u64,
}

impl Replay<'_> {
    /// Inserts the op of `unit` (emptied) into the map and returns it, or `None` (the replay stops
    /// there) when it is above the commit watermark or a piece not known durable fails its data
    /// checksum (then the records are counted as dropped by the caller: `unit` is left as it was).
    fn commit(
        &mut self,
        unit: &mut Vec<(NoteRecord, u64, u8)>,
        read: &mut impl FnMut(u64, &mut [u8]) -> Result<(), RecoveryError>,
    ) -> Result<Option<u64>, RecoveryError> {
        let op = unit.first().expect("an op to commit").0.op;
        let committed = op <= self.commit_through;
        // An inline note's data went with its block in one write: durable once its last slot is.
        let known_durable = unit
            .iter()
            .all(|&(_, seq, data_slots)| seq + u64::from(data_slots) < self.durable_before);
        let mut intact = true;
        if committed && !known_durable {
            for &(piece, seq, data_slots) in unit.iter() {
                if piece.kind == NoteKind::Write {
                    self.data.resize(piece.length as usize, 0);
                    let address = if data_slots > 0 {
                        inline_data_address(self.superblock, seq)
                    } else {
                        self.superblock.data_offset + piece.location
                    };
                    read(address, self.data)?;
                    intact &= crc32c::crc32c(self.data) == piece.data_crc;
                }
            }
        }
        if !committed || !intact {
            return Ok(None);
        }
        for (piece, seq, data_slots) in unit.drain(..) {
            if data_slots > 0 {
                self.inline_notes.push(InlineNote {
                    op,
                    offset: piece.offset,
                    length: piece.length,
                    home: piece.location,
                    data_address: inline_data_address(self.superblock, seq),
                });
            }
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
            data_slots: 0,
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
        checkpoint_of(&[extent])
    }

    fn checkpoint_of(records: &[ExtentRecord]) -> Vec<(u64, Vec<u8>)> {
        let mut extents = vec![0u8; JOURNAL_BLOCK_BYTES];
        for (index, record) in records.iter().enumerate() {
            format::put_extent(&mut extents, index, record);
        }
        let crc = crc32c::crc32c(format::extent_bytes(&extents, records.len()));
        let count = records.len() as u16;
        format::seal_block(
            &mut extents,
            &header(0, BlockKind::CheckpointExtents, count),
        );
        let mut done = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_checkpoint_done(
            &mut done,
            &CheckpointDone {
                checkpoint_id: 1,
                op: 5,
                first_seq: 0,
                end_seq: 1,
                extent_count: records.len() as u64,
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

    /// An inline note's block followed by its data slots, then a block that overwrites part of it.
    fn inline_ring(length: u64, data_slots: u8, data: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let note = NoteRecord {
            op: 1,
            epoch: 0,
            offset: 0,
            length,
            location: 8192,
            data_crc: crc32c::crc32c(data),
            kind: NoteKind::Write,
            piece_index: 0,
            piece_count: 1,
            catch_up: false,
        };
        let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_note(&mut block, 0, &note);
        let mut first = header(0, BlockKind::Notes, 1);
        first.commit_through = 1;
        first.data_slots = data_slots;
        format::seal_block(&mut block, &first);
        let mut ring = vec![(0, block)];
        let mut slots = data.to_vec();
        slots.resize(usize::from(data_slots) * JOURNAL_BLOCK_BYTES, 0);
        for (index, slot) in slots.chunks(JOURNAL_BLOCK_BYTES).enumerate() {
            ring.push((1 + index as u64, slot.to_vec()));
        }
        let zero = NoteRecord {
            op: 2,
            offset: 4096,
            length: 512,
            location: LOCATION_ZERO,
            data_crc: 0,
            kind: NoteKind::Zero,
            ..note
        };
        let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_note(&mut block, 0, &zero);
        let seq = 1 + u64::from(data_slots);
        let mut second = header(seq, BlockKind::Notes, 1);
        second.commit_through = 2;
        format::seal_block(&mut block, &second);
        ring.push((seq, block));
        ring
    }

    /// Recovery walks past an inline note's data slots, replays it, and asks for exactly its parts
    /// still mapped to be copied home; a torn inline note (data checksum fails, never vouched for)
    /// ends the log; slots that do not match the note are refused.
    #[test]
    fn inline_notes_replay_and_are_copied_home() {
        let data: Vec<u8> = (0..6144u32).map(|index| (index % 251) as u8).collect();
        let recovered = recover_ring(&inline_ring(6144, 2, &data)).expect("recovers");
        assert_eq!(recovered.committed_op, 2);
        assert_eq!(recovered.next_seq, 4);
        let superblock = superblock();
        let slot_1 = superblock.journal_offset + JOURNAL_BLOCK_BYTES as u64;
        assert_eq!(
            recovered.home_copies,
            vec![
                HomeCopy {
                    from: slot_1,
                    to: superblock.data_offset + 8192,
                    length: 4096,
                },
                HomeCopy {
                    from: slot_1 + 4608,
                    to: superblock.data_offset + 8192 + 4608,
                    length: 1536,
                },
            ]
        );

        let mut torn = inline_ring(6144, 2, &data);
        torn[2].1[100] ^= 1;
        torn.pop(); // nothing after it vouches for it
        let recovered = recover_ring(&torn).expect("a torn tail recovers");
        assert_eq!(recovered.committed_op, 0);
        assert!(recovered.home_copies.is_empty());

        assert!(matches!(
            recover_ring(&inline_ring(4096, 2, &data[..4096])),
            Err(RecoveryError::Malformed { seq: 0, .. })
        ));
    }

    /// Checkpoint extents that overlap (a forged block with a valid checksum; found by the
    /// journal_recovery fuzz target, where the extent map panicked on the older insert) or come out
    /// of volume order are refused.
    #[test]
    fn overlapping_checkpoint_extents_are_refused() {
        let newer = ExtentRecord {
            offset: 4096,
            length: 4096,
            op: 5,
            location: 0,
        };
        let older = ExtentRecord {
            offset: 0,
            length: 8192,
            op: 3,
            location: 8192,
        };
        for records in [[newer, older], [older, newer]] {
            assert!(matches!(
                recover_ring(&checkpoint_of(&records)),
                Err(RecoveryError::Checkpoint {
                    checkpoint_id: 1,
                    ..
                })
            ));
        }
    }

    /// An inline note's data is the host's: even a valid block of this volume there (a copied store
    /// image) is never taken for one, here a checkpoint-done claiming ops through 5.
    #[test]
    fn a_block_in_a_data_slot_is_data() {
        let mut forged = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_checkpoint_done(
            &mut forged,
            &CheckpointDone {
                checkpoint_id: 1,
                op: 5,
                first_seq: 0,
                end_seq: 0,
                extent_count: 0,
                extents_crc: 0,
                replay_from_seq: 0,
            },
        );
        format::seal_block(&mut forged, &header(1, BlockKind::CheckpointDone, 1));
        let recovered = recover_ring(&inline_ring(4096, 1, &forged)).expect("recovers");
        assert_eq!(recovered.committed_op, 2);
        assert_eq!(recovered.checkpoint_id, 0);
    }
}
