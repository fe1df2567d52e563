//! `--verify`: every written 512-byte sector carries a checksummed header; every read sector is checked.
//!
//! Sector layout (little-endian): bytes 0..8 the sector's own offset on the device, 8..16 the seed of the
//! write that stamped it, 16..508 filler derived from the seed and offset, 508..512 the CRC-32C of bytes
//! 0..508. A sector of all zeroes has never been written and passes. Any other content must carry a
//! matching checksum and its own offset: so a lost, misdirected or torn write, or a foreign write, is
//! caught. Owns: the layout. Must never: allocate.

/// The unit that carries one header.
pub const VERIFY_SECTOR_BYTES: usize = 512;
const OFFSET_END: usize = 8;
const SEED_END: usize = 16;
const CHECKSUM_START: usize = VERIFY_SECTOR_BYTES - 4;

/// Why a sector failed the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "verify failed at offset {offset}: checksum {stored:#010x} stored, {computed:#010x} computed"
    )]
    Checksum {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error(
        "verify failed at offset {offset}: the sector carries offset {stored} (misdirected write)"
    )]
    Misplaced { offset: u64, stored: u64 },
}

/// Filler generator: splitmix64, cheap and seeded per sector.
fn filler_word(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buffer` (a whole number of sectors) with what a write of `seed` at `offset` stores.
pub fn stamp(buffer: &mut [u8], offset: u64, seed: u64) {
    debug_assert!(buffer.len().is_multiple_of(VERIFY_SECTOR_BYTES));
    for (index, sector) in buffer.chunks_exact_mut(VERIFY_SECTOR_BYTES).enumerate() {
        let sector_offset = offset + (index * VERIFY_SECTOR_BYTES) as u64;
        sector[..OFFSET_END].copy_from_slice(&sector_offset.to_le_bytes());
        sector[OFFSET_END..SEED_END].copy_from_slice(&seed.to_le_bytes());
        let mut state = seed ^ sector_offset.rotate_left(32);
        for word in sector[SEED_END..CHECKSUM_START].chunks_mut(8) {
            let bytes = filler_word(&mut state).to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        let checksum = crc32c::crc32c(&sector[..CHECKSUM_START]);
        sector[CHECKSUM_START..].copy_from_slice(&checksum.to_le_bytes());
    }
}

/// Checks `buffer` (a whole number of sectors) read from `offset`; reports the first bad sector.
pub fn check(buffer: &[u8], offset: u64) -> Result<(), VerifyError> {
    debug_assert!(buffer.len().is_multiple_of(VERIFY_SECTOR_BYTES));
    for (index, sector) in buffer.chunks_exact(VERIFY_SECTOR_BYTES).enumerate() {
        let sector_offset = offset + (index * VERIFY_SECTOR_BYTES) as u64;
        if sector.iter().all(|&byte| byte == 0) {
            continue;
        }
        let mut stored_bytes = [0u8; 4];
        stored_bytes.copy_from_slice(&sector[CHECKSUM_START..]);
        let stored = u32::from_le_bytes(stored_bytes);
        let computed = crc32c::crc32c(&sector[..CHECKSUM_START]);
        if stored != computed {
            return Err(VerifyError::Checksum {
                offset: sector_offset,
                stored,
                computed,
            });
        }
        let mut offset_bytes = [0u8; 8];
        offset_bytes.copy_from_slice(&sector[..OFFSET_END]);
        let stored_offset = u64::from_le_bytes(offset_bytes);
        if stored_offset != sector_offset {
            return Err(VerifyError::Misplaced {
                offset: sector_offset,
                stored: stored_offset,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_sectors_pass_and_damage_is_caught() {
        let mut buffer = vec![0u8; 4 * VERIFY_SECTOR_BYTES];
        assert_eq!(check(&buffer, 0), Ok(()), "unwritten sectors pass");
        stamp(&mut buffer, 8192, 7);
        assert_eq!(check(&buffer, 8192), Ok(()));
        assert_eq!(
            check(&buffer, 4096),
            Err(VerifyError::Misplaced {
                offset: 4096,
                stored: 8192
            })
        );
        buffer[2 * VERIFY_SECTOR_BYTES + 100] ^= 1;
        assert!(matches!(
            check(&buffer, 8192),
            Err(VerifyError::Checksum { offset: 9216, .. })
        ));
        let pattern = vec![0x11u8; VERIFY_SECTOR_BYTES];
        assert!(check(&pattern, 0).is_err());
    }
}
