//! On-disk format of the journal: 4 KiB blocks, each with a checksummed header and fixed-size records.
//!
//! Owns: encoding and decoding of journal blocks, note records, checkpoint extent records and the
//! checkpoint-done record, all fixed-width little-endian. Must never: accept a block whose magic, volume
//! id or checksum is wrong (decoding returns `None`; the recovery decides what that means).
//!
//! Block header (64 bytes):
//! ```text
//!  0 magic u64 "FBJOURN1"   8 volume_id u64      16 seq u64            24 durable_before u64
//! 32 commit_through u64    40 incarnation u32   44 kind u8, data_slots u8, count u16
//! 48 checkpoint_id u32     52 resume_op u64     60 crc32c u32 (of the whole block, this field zero)
//! ```
//! `data_slots` (format version 3): the ring slots right after this block hold the data of its one
//! note (an inline note: one IO writes block and data; see `volume::copy`), padded to whole slots.
//! They take the next seqs, so the next block's seq is `seq + 1 + data_slots`. Never past the ring's
//! end: the writer does not inline a note whose slots would wrap.
//! `resume_op`: the commit watermark the writer's incarnation recovered to. Notes with a larger op in
//! blocks of earlier incarnations were dropped by that recovery and are void from then on.
//! `durable_before`: every block with a smaller seq was durable when this one was written.
//! `commit_through`: every op up to it is committed once this block and all before it are durable
//! (the writer's last op, capped by its commit limit: a replication master commits only what its
//! slave committed, so its recovery must not go further).

pub const JOURNAL_BLOCK_BYTES: usize = 4096;
pub const BLOCK_HEADER_BYTES: usize = 64;
pub const NOTE_RECORD_BYTES: usize = 64;
pub const EXTENT_RECORD_BYTES: usize = 32;
pub const NOTES_PER_BLOCK: usize = (JOURNAL_BLOCK_BYTES - BLOCK_HEADER_BYTES) / NOTE_RECORD_BYTES;
/// Most data slots an inline note takes (its data is at most this many journal blocks).
pub const INLINE_SLOTS_MAX: usize = 16;
pub const EXTENTS_PER_BLOCK: usize =
    (JOURNAL_BLOCK_BYTES - BLOCK_HEADER_BYTES) / EXTENT_RECORD_BYTES;

const BLOCK_MAGIC: u64 = u64::from_le_bytes(*b"FBJOURN1");
/// Location value meaning "reads as zeros, no data".
pub const LOCATION_ZERO: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockKind {
    Notes = 1,
    CheckpointExtents = 2,
    CheckpointDone = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    pub volume_id: u64,
    pub seq: u64,
    pub durable_before: u64,
    pub commit_through: u64,
    pub incarnation: u32,
    pub kind: BlockKind,
    pub count: u16,
    /// Notes blocks: ring slots after this one holding the data of its inline note (0: none).
    pub data_slots: u8,
    /// Checkpoint blocks: which checkpoint (fits 32 bits: one per half journal ring).
    pub checkpoint_id: u64,
    pub resume_op: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NoteKind {
    Write = 1,
    Zero = 2,
}

/// Flag bit of a note record (byte 45): a catch-up record. Its op may skip ahead of the watermark
/// (the ops in between are not part of the catch-up), several notes may carry the same op (one
/// catch-up op, complete only when a record of a later op follows), and a zero-length `Zero` record
/// (no extent) only moves the watermark.
pub const NOTE_FLAG_CATCH_UP: u8 = 1;

/// One piece of a note: a write whose data landed in several places has one record per place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoteRecord {
    pub op: u64,
    pub epoch: u64,
    /// Volume byte offset and length of this piece.
    pub offset: u64,
    pub length: u64,
    /// Data area address, or `LOCATION_ZERO`.
    pub location: u64,
    pub data_crc: u32,
    pub kind: NoteKind,
    pub piece_index: u16,
    pub piece_count: u16,
    /// Written by catch-up (`NOTE_FLAG_CATCH_UP`).
    pub catch_up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRecord {
    pub offset: u64,
    pub length: u64,
    pub op: u64,
    pub location: u64,
}

/// Written once every block of a checkpoint is durable; recovery starts from the newest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointDone {
    pub checkpoint_id: u64,
    /// The checkpoint holds exactly the committed state through this op.
    pub op: u64,
    pub first_seq: u64,
    pub end_seq: u64,
    pub extent_count: u64,
    pub extents_crc: u32,
    /// Replay starts here: the first block that may hold a note with op > `op`.
    pub replay_from_seq: u64,
}

fn put_u64(block: &mut [u8], at: usize, value: u64) {
    block[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn put_u32(block: &mut [u8], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u16(block: &mut [u8], at: usize, value: u16) {
    block[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

fn get_u64(block: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"))
}

fn get_u32(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u16(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(block[at..at + 2].try_into().expect("2 bytes"))
}

/// Fills in the header and checksum of a block whose records are already in place.
pub fn seal_block(block: &mut [u8], header: &BlockHeader) {
    assert_eq!(block.len(), JOURNAL_BLOCK_BYTES);
    let capacity = match header.kind {
        BlockKind::Notes => NOTES_PER_BLOCK,
        BlockKind::CheckpointExtents => EXTENTS_PER_BLOCK,
        BlockKind::CheckpointDone => 1,
    };
    assert!(usize::from(header.count) <= capacity, "block over capacity");
    put_u64(block, 0, BLOCK_MAGIC);
    put_u64(block, 8, header.volume_id);
    put_u64(block, 16, header.seq);
    put_u64(block, 24, header.durable_before);
    put_u64(block, 32, header.commit_through);
    put_u32(block, 40, header.incarnation);
    block[44] = header.kind as u8;
    assert!(
        header.data_slots == 0
            || header.kind == BlockKind::Notes
                && header.count == 1
                && usize::from(header.data_slots) <= INLINE_SLOTS_MAX,
        "only a notes block with one note carries inline data"
    );
    block[45] = header.data_slots;
    put_u16(block, 46, header.count);
    let checkpoint_id = u32::try_from(header.checkpoint_id).expect("checkpoint ids fit 32 bits");
    put_u32(block, 48, checkpoint_id);
    put_u64(block, 52, header.resume_op);
    put_u32(block, 60, 0);
    let crc = crc32c::crc32c(block);
    put_u32(block, 60, crc);
}

/// Decodes a block header, checking magic, volume id, kind, count and checksum.
pub fn open_block(block: &[u8], volume_id: u64) -> Option<BlockHeader> {
    if block.len() != JOURNAL_BLOCK_BYTES
        || get_u64(block, 0) != BLOCK_MAGIC
        || get_u64(block, 8) != volume_id
    {
        return None;
    }
    let stored = get_u32(block, 60);
    let mut crc = crc32c::crc32c(&block[..60]);
    crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc = crc32c::crc32c_append(crc, &block[64..]);
    if crc != stored {
        return None;
    }
    let kind = match block[44] {
        1 => BlockKind::Notes,
        2 => BlockKind::CheckpointExtents,
        3 => BlockKind::CheckpointDone,
        _ => return None,
    };
    let count = get_u16(block, 46);
    let capacity = match kind {
        BlockKind::Notes => NOTES_PER_BLOCK,
        BlockKind::CheckpointExtents => EXTENTS_PER_BLOCK,
        BlockKind::CheckpointDone => 1,
    };
    let data_slots = block[45];
    if usize::from(count) > capacity
        || data_slots != 0
            && (kind != BlockKind::Notes
                || count != 1
                || usize::from(data_slots) > INLINE_SLOTS_MAX)
    {
        return None;
    }
    Some(BlockHeader {
        volume_id,
        seq: get_u64(block, 16),
        durable_before: get_u64(block, 24),
        commit_through: get_u64(block, 32),
        incarnation: get_u32(block, 40),
        kind,
        count,
        data_slots,
        checkpoint_id: u64::from(get_u32(block, 48)),
        resume_op: get_u64(block, 52),
    })
}

pub fn put_note(block: &mut [u8], index: usize, note: &NoteRecord) {
    debug_assert!(index < NOTES_PER_BLOCK);
    let at = BLOCK_HEADER_BYTES + index * NOTE_RECORD_BYTES;
    let record = &mut block[at..at + NOTE_RECORD_BYTES];
    put_u64(record, 0, note.op);
    put_u64(record, 8, note.epoch);
    put_u64(record, 16, note.offset);
    put_u64(record, 24, note.length);
    put_u64(record, 32, note.location);
    put_u32(record, 40, note.data_crc);
    record[44] = note.kind as u8;
    record[45] = if note.catch_up { NOTE_FLAG_CATCH_UP } else { 0 };
    put_u16(record, 46, note.piece_index);
    put_u16(record, 48, note.piece_count);
    record[50..].fill(0);
}

/// Decodes a note record; `None` if it is malformed (a checksummed block with a bad record means a
/// writer bug or a forged block: recovery refuses it).
pub fn get_note(block: &[u8], index: usize) -> Option<NoteRecord> {
    let at = BLOCK_HEADER_BYTES + index * NOTE_RECORD_BYTES;
    let record = block.get(at..at + NOTE_RECORD_BYTES)?;
    let kind = match record[44] {
        1 => NoteKind::Write,
        2 => NoteKind::Zero,
        _ => return None,
    };
    if record[45] & !NOTE_FLAG_CATCH_UP != 0 {
        return None;
    }
    let note = NoteRecord {
        op: get_u64(record, 0),
        epoch: get_u64(record, 8),
        offset: get_u64(record, 16),
        length: get_u64(record, 24),
        location: get_u64(record, 32),
        data_crc: get_u32(record, 40),
        kind,
        piece_index: get_u16(record, 46),
        piece_count: get_u16(record, 48),
        catch_up: record[45] & NOTE_FLAG_CATCH_UP != 0,
    };
    // Only a catch-up jump has no extent: a zero-length `Zero` record.
    let sane = note.op > 0
        && (note.length > 0 || note.catch_up && note.kind == NoteKind::Zero)
        && note.offset.is_multiple_of(512)
        && note.length.is_multiple_of(512)
        && note.piece_index < note.piece_count
        && (note.kind == NoteKind::Zero) == (note.location == LOCATION_ZERO)
        && (note.kind == NoteKind::Zero || note.location.is_multiple_of(512));
    sane.then_some(note)
}

pub fn put_extent(block: &mut [u8], index: usize, extent: &ExtentRecord) {
    debug_assert!(index < EXTENTS_PER_BLOCK);
    let at = BLOCK_HEADER_BYTES + index * EXTENT_RECORD_BYTES;
    put_u64(block, at, extent.offset);
    put_u64(block, at + 8, extent.length);
    put_u64(block, at + 16, extent.op);
    put_u64(block, at + 24, extent.location);
}

pub fn get_extent(block: &[u8], index: usize) -> ExtentRecord {
    let at = BLOCK_HEADER_BYTES + index * EXTENT_RECORD_BYTES;
    ExtentRecord {
        offset: get_u64(block, at),
        length: get_u64(block, at + 8),
        op: get_u64(block, at + 16),
        location: get_u64(block, at + 24),
    }
}

/// The bytes of the first `count` extent records, for the checkpoint checksum.
pub fn extent_bytes(block: &[u8], count: usize) -> &[u8] {
    &block[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + count * EXTENT_RECORD_BYTES]
}

pub fn put_checkpoint_done(block: &mut [u8], done: &CheckpointDone) {
    let at = BLOCK_HEADER_BYTES;
    put_u64(block, at, done.checkpoint_id);
    put_u64(block, at + 8, done.op);
    put_u64(block, at + 16, done.first_seq);
    put_u64(block, at + 24, done.end_seq);
    put_u64(block, at + 32, done.extent_count);
    put_u32(block, at + 40, done.extents_crc);
    put_u64(block, at + 48, done.replay_from_seq);
}

pub fn get_checkpoint_done(block: &[u8]) -> CheckpointDone {
    let at = BLOCK_HEADER_BYTES;
    CheckpointDone {
        checkpoint_id: get_u64(block, at),
        op: get_u64(block, at + 8),
        first_seq: get_u64(block, at + 16),
        end_seq: get_u64(block, at + 24),
        extent_count: get_u64(block, at + 32),
        extents_crc: get_u32(block, at + 40),
        replay_from_seq: get_u64(block, at + 48),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: BlockKind, count: u16) -> BlockHeader {
        BlockHeader {
            volume_id: 42,
            seq: 7,
            durable_before: 5,
            commit_through: 99,
            incarnation: 2,
            kind,
            count,
            data_slots: 0,
            checkpoint_id: 0,
            resume_op: 3,
        }
    }

    #[test]
    fn blocks_round_trip_and_detect_damage() {
        let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
        let note = NoteRecord {
            op: 9,
            epoch: 1,
            offset: 4096,
            length: 8192,
            location: 1 << 20,
            data_crc: 0xdead_beef,
            kind: NoteKind::Write,
            piece_index: 0,
            piece_count: 1,
            catch_up: false,
        };
        put_note(&mut block, 0, &note);
        seal_block(&mut block, &header(BlockKind::Notes, 1));
        assert_eq!(open_block(&block, 42), Some(header(BlockKind::Notes, 1)));
        assert_eq!(get_note(&block, 0), Some(note));
        assert_eq!(open_block(&block, 43), None, "another volume's block");
        for position in [0, 20, 61, 100, 4095] {
            let mut damaged = block.clone();
            damaged[position] ^= 0x10;
            assert_eq!(open_block(&damaged, 42), None, "flip at {position}");
        }
    }

    #[test]
    fn malformed_records_are_rejected() {
        let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
        let mut note = NoteRecord {
            op: 1,
            epoch: 0,
            offset: 100,
            length: 512,
            location: 0,
            data_crc: 0,
            kind: NoteKind::Write,
            piece_index: 0,
            piece_count: 1,
            catch_up: false,
        };
        put_note(&mut block, 0, &note);
        assert_eq!(get_note(&block, 0), None, "misaligned offset");
        note.offset = 0;
        note.location = LOCATION_ZERO;
        put_note(&mut block, 0, &note);
        assert_eq!(get_note(&block, 0), None, "a write without a location");
        note.kind = NoteKind::Zero;
        note.length = 0;
        put_note(&mut block, 0, &note);
        assert_eq!(get_note(&block, 0), None, "zero length, not catch-up");
        note.catch_up = true;
        put_note(&mut block, 0, &note);
        assert_eq!(get_note(&block, 0), Some(note), "a catch-up jump");
        note.kind = NoteKind::Write;
        note.location = 0;
        put_note(&mut block, 0, &note);
        assert_eq!(get_note(&block, 0), None, "a zero-length write");
        block[BLOCK_HEADER_BYTES + 45] = 0x82;
        assert_eq!(get_note(&block, 0), None, "unknown flag bits");
    }

    #[test]
    fn capacities() {
        assert_eq!(NOTES_PER_BLOCK, 63);
        assert_eq!(EXTENTS_PER_BLOCK, 126);
    }
}
