//! Recovery of a store whose journal holds hostile blocks: blocks with valid checksums (as a writer bug, a
//! forged store or another version's writer could leave) whose fields the fuzzer chooses, plus raw
//! garbage. Recovery, and the allocator and copy built from what it returns, must refuse what they
//! cannot use with a typed error; never panic, loop, or return a state outside the volume. The input is a list of block descriptions decoded with a cursor,
//! so that the fuzzer spends its time on the fields recovery interprets, not on finding checksums.
#![no_main]

use ferroblock::journal::format::{
    self, BlockHeader, BlockKind, CheckpointDone, EXTENTS_PER_BLOCK, ExtentRecord,
    INLINE_SLOTS_MAX, JOURNAL_BLOCK_BYTES, LOCATION_ZERO, NOTES_PER_BLOCK, NoteKind, NoteRecord,
};
use ferroblock::journal::recovery::recover;
use ferroblock::journal::superblock::Superblock;
use ferroblock::volume::copy::{Durability, VolumeCopy};
use ferroblock::volume::open::allocator_for;
use libfuzzer_sys::fuzz_target;

const VOLUME_ID: u64 = 0xF0F0_1234;
const RING_BLOCKS: u64 = 64;
const VOLUME_BYTES: u64 = 1 << 20;
const DATA_BYTES: u64 = 2 << 20;
/// Records per block the fuzzer fills at most (recovery's cost is per record; the format allows more).
const RECORDS_MAX: usize = 6;

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&byte, rest)) => {
                self.0 = rest;
                byte
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u16()) | (u64::from(self.u16()) << 16) | (u64::from(self.u16()) << 32)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A byte offset: mostly sector multiples inside a small space, sometimes anything.
    fn offset(&mut self, space: u64) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => u64::MAX - u64::from(self.u16()),
            2 => u64::from(self.u16()) % space,
            _ => u64::from(self.u16()) * 512 % space,
        }
    }

    fn length(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => 0,
            2 => u64::from(self.u16()),
            _ => (u64::from(self.u8()) + 1) * 512,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let superblock =
        Superblock::with_regions(VOLUME_ID, "fuzz", VOLUME_BYTES, RING_BLOCKS, DATA_BYTES);
    let mut ring = vec![0u8; (RING_BLOCKS as usize) * JOURNAL_BLOCK_BYTES];
    // Checkpoint-done blocks whose extent checksum the harness computes once every block is placed.
    let mut fix_done_crc: Vec<(usize, BlockHeader, CheckpointDone)> = Vec::new();
    let mut cursor = Cursor(data);
    let mut blocks = 0;
    while !cursor.is_empty() && blocks < 2 * RING_BLOCKS {
        blocks += 1;
        let choice = cursor.u8();
        let lap = u64::from(cursor.u8() % 4);
        let slot = u64::from(cursor.u8()) % RING_BLOCKS;
        let block_range =
            (slot as usize) * JOURNAL_BLOCK_BYTES..(slot as usize + 1) * JOURNAL_BLOCK_BYTES;
        if choice % 16 == 0 {
            // Raw bytes: a torn or foreign block.
            let block = &mut ring[block_range];
            for byte in block.iter_mut().take(64) {
                *byte = cursor.u8();
            }
            continue;
        }
        let seq = if choice % 16 == 1 {
            cursor.u64()
        } else {
            slot + lap * RING_BLOCKS
        };
        let kind = match choice % 3 {
            0 => BlockKind::Notes,
            1 => BlockKind::CheckpointExtents,
            _ => BlockKind::CheckpointDone,
        };
        let capacity = match kind {
            BlockKind::Notes => NOTES_PER_BLOCK,
            BlockKind::CheckpointExtents => EXTENTS_PER_BLOCK,
            BlockKind::CheckpointDone => 1,
        };
        let count = (usize::from(cursor.u8()) % (RECORDS_MAX + 1)).min(capacity);
        // An inline note's data slots: only a notes block with one record may claim some.
        let data_slots = if kind == BlockKind::Notes && count == 1 {
            cursor.u8() % (INLINE_SLOTS_MAX as u8 + 1)
        } else {
            0
        };
        let header = BlockHeader {
            volume_id: VOLUME_ID,
            seq,
            durable_before: seq.wrapping_add(u64::from(cursor.u8())).wrapping_sub(8),
            commit_through: u64::from(cursor.u8()),
            incarnation: u32::from(cursor.u8() % 4),
            kind,
            count: count as u16,
            data_slots,
            checkpoint_id: u64::from(cursor.u8() % 4),
            resume_op: u64::from(cursor.u8() % 8),
        };
        let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
        match kind {
            BlockKind::Notes => {
                for index in 0..count {
                    let flags = cursor.u8();
                    let length = cursor.length();
                    let zero = flags & 1 != 0;
                    let note = NoteRecord {
                        op: u64::from(cursor.u8()),
                        epoch: u64::from(cursor.u8() % 3),
                        offset: cursor.offset(VOLUME_BYTES),
                        length,
                        location: if zero {
                            LOCATION_ZERO
                        } else {
                            cursor.offset(DATA_BYTES)
                        },
                        // Data reads back as zeros: a note may claim exactly that.
                        data_crc: if flags & 2 != 0 && length <= 1 << 20 {
                            crc32c::crc32c(&vec![0u8; length as usize])
                        } else {
                            u32::from(cursor.u16())
                        },
                        kind: if zero {
                            NoteKind::Zero
                        } else {
                            NoteKind::Write
                        },
                        piece_index: u16::from(cursor.u8() % 3),
                        piece_count: u16::from(cursor.u8() % 3),
                        catch_up: flags & 4 != 0,
                    };
                    format::put_note(&mut block, index, &note);
                }
            }
            BlockKind::CheckpointExtents => {
                for index in 0..count {
                    let zero = cursor.u8() & 1 != 0;
                    let extent = ExtentRecord {
                        offset: cursor.offset(VOLUME_BYTES),
                        length: cursor.length(),
                        op: u64::from(cursor.u8()),
                        location: if zero {
                            LOCATION_ZERO
                        } else {
                            cursor.offset(DATA_BYTES)
                        },
                    };
                    format::put_extent(&mut block, index, &extent);
                }
            }
            BlockKind::CheckpointDone => {
                let first_seq = u64::from(cursor.u8());
                let done = CheckpointDone {
                    checkpoint_id: header.checkpoint_id,
                    op: u64::from(cursor.u8()),
                    first_seq,
                    end_seq: first_seq + u64::from(cursor.u8() % 8),
                    extent_count: u64::from(cursor.u8() % 16),
                    extents_crc: u32::from(cursor.u16()),
                    replay_from_seq: u64::from(cursor.u8()),
                };
                format::put_checkpoint_done(&mut block, &done);
                if cursor.u8() & 1 != 0 {
                    fix_done_crc.push((slot as usize, header, done));
                }
            }
        }
        format::seal_block(&mut block, &header);
        ring[block_range].copy_from_slice(&block);
    }
    // Make chosen checkpoints' extent checksums and counts right, so that recovery gets past them.
    for (slot, header, mut done) in fix_done_crc {
        let mut crc = 0;
        let mut count = 0;
        for seq in done.first_seq..done.end_seq {
            let at = (seq % RING_BLOCKS) as usize * JOURNAL_BLOCK_BYTES;
            let block = &ring[at..at + JOURNAL_BLOCK_BYTES];
            if let Some(extents) = format::open_block(block, VOLUME_ID)
                && extents.kind == BlockKind::CheckpointExtents
                && extents.checkpoint_id == done.checkpoint_id
                && extents.seq == seq
            {
                crc = crc32c::crc32c_append(
                    crc,
                    format::extent_bytes(block, usize::from(extents.count)),
                );
                count += u64::from(extents.count);
            }
        }
        done.extents_crc = crc;
        done.extent_count = count;
        let mut block = vec![0u8; JOURNAL_BLOCK_BYTES];
        format::put_checkpoint_done(&mut block, &done);
        format::seal_block(&mut block, &header);
        ring[slot * JOURNAL_BLOCK_BYTES..(slot + 1) * JOURNAL_BLOCK_BYTES].copy_from_slice(&block);
    }

    let journal = superblock.journal_offset..superblock.journal_offset + superblock.journal_bytes;
    let store_bytes = superblock.store_bytes();
    let mut read_at = |address: u64, buffer: &mut [u8]| -> std::io::Result<()> {
        let end = address
            .checked_add(buffer.len() as u64)
            .filter(|&end| end <= store_bytes)
            .ok_or_else(|| std::io::Error::other("read past the end of the store"))?;
        buffer.fill(0);
        let (from, to) = (address.max(journal.start), end.min(journal.end));
        if from < to {
            let ring_at = (from - journal.start) as usize;
            let buffer_at = (from - address) as usize;
            let len = (to - from) as usize;
            buffer[buffer_at..buffer_at + len].copy_from_slice(&ring[ring_at..ring_at + len]);
        }
        Ok(())
    };
    let Ok(recovered) = recover(&superblock, &mut read_at) else {
        return;
    };
    for extent in recovered.map.iter() {
        assert!(
            extent.offset + extent.length <= VOLUME_BYTES,
            "{extent:?} outside the volume"
        );
    }
    assert!(recovered.live_from_seq <= recovered.next_seq);
    // Inline notes' data is copied from the journal to the data area, never elsewhere.
    for copy in &recovered.home_copies {
        assert!(journal.start <= copy.from && copy.from + copy.length <= journal.end);
        assert!(superblock.data_offset <= copy.to && copy.to + copy.length <= store_bytes);
    }
    // What `open_copy` does next: the allocator (refusing shared data space), then the copy.
    if let Ok(allocator) = allocator_for(&superblock, &recovered.map) {
        let copy = VolumeCopy::new(superblock, recovered, allocator, Durability::Fdatasync);
        drop(copy);
    }
});
