//! The superblock: one 512-byte sector at offset 0 of the backing store, written at creation and on
//! resize only. One sector so that its write is atomic on every device; no A/B slots, so any damage is
//! detected and refused rather than "repaired" from an older copy.
//!
//! ```text
//!  0 magic u64 "FBVOLUM1"   8 version u32        12 crc32c u32 (of the sector, this field zero)
//! 16 volume_id u64         24 volume_size u64   32 journal_offset u64  40 journal_bytes u64
//! 48 data_offset u64       56 data_bytes u64    64 name_len u16        66 name (up to 128 bytes)
//! ```

use crate::journal::format::JOURNAL_BLOCK_BYTES;

pub const SUPERBLOCK_BYTES: usize = 512;
/// 2: note records may carry the catch-up flag (`journal::format::NOTE_FLAG_CATCH_UP`), which
/// version 1 binaries would misread. 3: a notes block may be followed by the data of its inline note
/// (`journal::format`, `data_slots`), which version 2 binaries would misread.
pub const FORMAT_VERSION: u32 = 3;
const MAGIC: u64 = u64::from_le_bytes(*b"FBVOLUM1");
const NAME_BYTES_MAX: usize = 128;

/// Where everything lives in the backing store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_id: u64,
    pub name: String,
    pub volume_size: u64,
    pub journal_offset: u64,
    pub journal_bytes: u64,
    pub data_offset: u64,
    pub data_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("not a ferroblock volume (bad magic)")]
    BadMagic,
    #[error("superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("unsupported format version {0} (this build reads version {FORMAT_VERSION})")]
    Version(u32),
    #[error("inconsistent layout: {0}")]
    Layout(&'static str),
}

impl Superblock {
    /// The layout for a new volume: journal sized to hold two full checkpoints plus notes, data area sized
    /// to the volume plus room for writes in flight (redirect-on-write needs free space to write into).
    /// `spare_percent`: the data area's free space as a share of the volume (`None`: the default, see
    /// `spare_bytes_for`). `None` when the store would exceed `STORE_BYTES_MAX`.
    pub fn new_layout(
        volume_id: u64,
        name: &str,
        volume_size: u64,
        spare_percent: Option<u32>,
    ) -> Option<Superblock> {
        let journal_blocks = journal_bytes_for(volume_size) / JOURNAL_BLOCK_BYTES as u64;
        let superblock = Superblock::with_regions(
            volume_id,
            name,
            volume_size,
            journal_blocks,
            data_bytes_for(volume_size, spare_percent)?,
        );
        superblock
            .data_offset
            .checked_add(superblock.data_bytes)
            .is_some_and(|end| end <= STORE_BYTES_MAX)
            .then_some(superblock)
    }

    /// Free space of the data area beyond the volume's size.
    pub fn spare_bytes(&self) -> u64 {
        self.data_bytes.saturating_sub(self.volume_size)
    }

    /// The superblock block, then a journal ring of `journal_blocks`, then `data_bytes` of data area
    /// (tests, simulators and fuzzers choose small regions; `new_layout` sizes them for a volume).
    pub fn with_regions(
        volume_id: u64,
        name: &str,
        volume_size: u64,
        journal_blocks: u64,
        data_bytes: u64,
    ) -> Superblock {
        let journal_offset = JOURNAL_BLOCK_BYTES as u64;
        let journal_bytes = journal_blocks * JOURNAL_BLOCK_BYTES as u64;
        Superblock {
            volume_id,
            name: name.to_owned(),
            volume_size,
            journal_offset,
            journal_bytes,
            data_offset: journal_offset + journal_bytes,
            data_bytes,
        }
    }

    /// Total bytes the backing store must have.
    pub fn store_bytes(&self) -> u64 {
        self.data_offset + self.data_bytes
    }

    pub fn journal_blocks(&self) -> u64 {
        self.journal_bytes / JOURNAL_BLOCK_BYTES as u64
    }

    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        assert!(self.name.len() <= NAME_BYTES_MAX);
        let mut sector = [0u8; SUPERBLOCK_BYTES];
        sector[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        sector[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        for (at, value) in [
            (16, self.volume_id),
            (24, self.volume_size),
            (32, self.journal_offset),
            (40, self.journal_bytes),
            (48, self.data_offset),
            (56, self.data_bytes),
        ] {
            sector[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        sector[64..66].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        sector[66..66 + self.name.len()].copy_from_slice(self.name.as_bytes());
        let crc = crc32c::crc32c(&sector);
        sector[12..16].copy_from_slice(&crc.to_le_bytes());
        sector
    }

    pub fn decode(sector: &[u8]) -> Result<Superblock, SuperblockError> {
        assert!(sector.len() >= SUPERBLOCK_BYTES);
        let sector = &sector[..SUPERBLOCK_BYTES];
        let u64_at =
            |at: usize| u64::from_le_bytes(sector[at..at + 8].try_into().expect("8 bytes"));
        if u64_at(0) != MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        let stored = u32::from_le_bytes(sector[12..16].try_into().expect("4 bytes"));
        let mut zeroed = [0u8; SUPERBLOCK_BYTES];
        zeroed.copy_from_slice(sector);
        zeroed[12..16].fill(0);
        let computed = crc32c::crc32c(&zeroed);
        if stored != computed {
            return Err(SuperblockError::Checksum { stored, computed });
        }
        let version = u32::from_le_bytes(sector[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(SuperblockError::Version(version));
        }
        let name_len = usize::from(u16::from_le_bytes([sector[64], sector[65]]));
        if name_len > NAME_BYTES_MAX {
            return Err(SuperblockError::Layout("name too long"));
        }
        let name = std::str::from_utf8(&sector[66..66 + name_len])
            .map_err(|_| SuperblockError::Layout("name is not UTF-8"))?
            .to_owned();
        let superblock = Superblock {
            volume_id: u64_at(16),
            name,
            volume_size: u64_at(24),
            journal_offset: u64_at(32),
            journal_bytes: u64_at(40),
            data_offset: u64_at(48),
            data_bytes: u64_at(56),
        };
        superblock.check()?;
        Ok(superblock)
    }

    fn check(&self) -> Result<(), SuperblockError> {
        let block = JOURNAL_BLOCK_BYTES as u64;
        if !self.journal_offset.is_multiple_of(block)
            || !self.journal_bytes.is_multiple_of(block)
            || !self.data_offset.is_multiple_of(block)
            || !self.data_bytes.is_multiple_of(block)
        {
            return Err(SuperblockError::Layout("regions not aligned to 4 KiB"));
        }
        if self.journal_offset < SUPERBLOCK_BYTES as u64
            || self.journal_offset.checked_add(self.journal_bytes) != Some(self.data_offset)
            || self.data_offset.checked_add(self.data_bytes).is_none()
        {
            return Err(SuperblockError::Layout("regions overlap or overflow"));
        }
        if self.volume_size == 0
            || !self.volume_size.is_multiple_of(512)
            || self.journal_bytes < 64 * block
        {
            return Err(SuperblockError::Layout(
                "volume or journal size out of range",
            ));
        }
        Ok(())
    }
}

/// Journal: room for two checkpoints of the worst case (one 32-byte record per 512-byte extent, i.e.
/// 1/16 of the volume each) plus 32 MiB of notes, at most 4 GiB.
pub fn journal_bytes_for(volume_size: u64) -> u64 {
    let worst_checkpoint = volume_size / 16;
    (2 * worst_checkpoint + (32 << 20))
        .min(4 << 30)
        .next_multiple_of(JOURNAL_BLOCK_BYTES as u64)
}

/// Data area: the volume plus its spare (`spare_bytes_for`), in whole blocks; `None` when that does not
/// fit in 64 bits.
pub fn data_bytes_for(volume_size: u64, spare_percent: Option<u32>) -> Option<u64> {
    volume_size
        .checked_add(spare_bytes_for(volume_size, spare_percent))?
        .checked_next_multiple_of(JOURNAL_BLOCK_BYTES as u64)
}

/// Spare of the data area: free space for writes between allocation and the commit that frees what
/// they overwrite. By default 1/32 of the volume; `spare_percent` of it when chosen (`serve
/// --spare-percent`); at least 64 MiB either way (saturating at `u64::MAX`). Space is reused only
/// after a sync, so in write-back mode a larger spare means fewer syncs under overwrites: on a disk
/// whose flush holds up the writes behind it, that is worth the space (tuning.md §3).
pub fn spare_bytes_for(volume_size: u64, spare_percent: Option<u32>) -> u64 {
    let chosen = match spare_percent {
        None => u128::from(volume_size / 32),
        Some(percent) => u128::from(volume_size) * u128::from(percent) / 100,
    };
    u64::try_from(chosen)
        .unwrap_or(u64::MAX)
        .max(SPARE_BYTES_MIN)
}

/// The largest store: file offsets are signed 64-bit numbers.
pub const STORE_BYTES_MAX: u64 = i64::MAX as u64;

/// The smallest spare a data area gets.
const SPARE_BYTES_MIN: u64 = 64 << 20;
/// The largest `--spare-percent`: ten times the volume.
pub const SPARE_PERCENT_MAX: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of another format version (here 2, before inline notes) is refused by name, not read:
    /// its journal would be misread.
    #[test]
    fn other_format_versions_are_refused() {
        let mut sector = Superblock::new_layout(77, "vol0", 1 << 30, None)
            .expect("fits")
            .encode();
        sector[8..12].copy_from_slice(&2u32.to_le_bytes());
        sector[12..16].fill(0);
        let crc = crc32c::crc32c(&sector);
        sector[12..16].copy_from_slice(&crc.to_le_bytes());
        let error = Superblock::decode(&sector).expect_err("version 2 is refused");
        assert_eq!(error, SuperblockError::Version(2));
        assert_eq!(
            error.to_string(),
            "unsupported format version 2 (this build reads version 3)"
        );
    }

    #[test]
    fn round_trip_and_damage() {
        let superblock = Superblock::new_layout(77, "vol0", 1 << 30, None).expect("fits");
        let sector = superblock.encode();
        assert_eq!(Superblock::decode(&sector), Ok(superblock.clone()));
        let mut damaged = sector;
        damaged[30] ^= 1;
        assert!(matches!(
            Superblock::decode(&damaged),
            Err(SuperblockError::Checksum { .. })
        ));
        let mut foreign = sector;
        foreign[0] = b'X';
        assert_eq!(Superblock::decode(&foreign), Err(SuperblockError::BadMagic));
    }

    #[test]
    fn overhead_of_a_gibibyte_volume_is_bounded() {
        let superblock = Superblock::new_layout(1, "v", 1 << 30, None).expect("fits");
        // 1 GiB volume: store under 1.3 GiB whatever the write pattern.
        assert!(
            superblock.store_bytes() < (13 << 30) / 10,
            "{}",
            superblock.store_bytes()
        );
    }

    #[test]
    fn spare_is_the_default_or_the_chosen_share_and_at_least_64_mib() {
        let gib = 1u64 << 30;
        assert_eq!(spare_bytes_for(gib, None), 64 << 20);
        assert_eq!(spare_bytes_for(64 * gib, None), 2 * gib);
        let half = Superblock::new_layout(1, "v", gib, Some(50)).expect("fits");
        assert_eq!(
            half.data_bytes,
            (gib + gib / 2).next_multiple_of(JOURNAL_BLOCK_BYTES as u64)
        );
        assert_eq!(half.spare_bytes(), gib / 2);
        assert_eq!(spare_bytes_for(gib, Some(1)), 64 << 20);
        assert_eq!(spare_bytes_for(gib, Some(0)), 64 << 20);
        // Journal and data follow each other whatever the spare.
        assert_eq!(half.store_bytes(), half.data_offset + half.data_bytes);
    }

    /// The largest volume the command line takes (4 EiB) with the largest spare would overflow: no
    /// layout, rather than a wrapped one.
    #[test]
    fn a_layout_beyond_the_largest_store_is_refused() {
        let largest_volume = 1u64 << 62;
        assert!(Superblock::new_layout(1, "v", largest_volume, None).is_some());
        assert!(Superblock::new_layout(1, "v", largest_volume, Some(50)).is_some());
        for percent in [100, 300, 1000] {
            assert_eq!(
                Superblock::new_layout(1, "v", largest_volume, Some(percent)),
                None,
                "{percent} %"
            );
        }
        assert_eq!(spare_bytes_for(largest_volume, Some(1000)), u64::MAX);
        assert_eq!(data_bytes_for(u64::MAX - 4095, None), None);
    }
}
