//! Opening a persistent volume copy: create and format a new backing store, or check and recover an
//! existing one.
//!
//! Owns: the decisions about the backing file at start-up (new or existing, size, name, resize) and the
//! errors that name the file and the problem. Must never: change an existing store it refuses, or start
//! serving a store whose superblock, journal or checkpoint failed a check.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::alloc::Allocator;
use crate::btree::{ExtentMap, Location, Piece};
use crate::io::AlignedBuf;
use crate::io::buf::IO_ALIGNMENT;
use crate::journal::format::JOURNAL_BLOCK_BYTES;
use crate::journal::recovery::{self, RecoveryError};
use crate::journal::superblock::{SUPERBLOCK_BYTES, Superblock, SuperblockError, spare_bytes_for};
use crate::volume::copy::{Durability, VolumeCopy};

/// Size of a volume created without an explicit `--size`.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    pub problem: Problem,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("superblock: {0}")]
    Superblock(#[from] SuperblockError),
    #[error("this store holds volume {found:?}, not {wanted:?} (another volume's data?)")]
    WrongVolume { found: String, wanted: String },
    #[error(
        "the volume is {existing} bytes; --size {wanted} differs (add --resize to grow; shrinking is refused)"
    )]
    SizeMismatch { existing: u64, wanted: u64 },
    #[error(
        "the store's spare is {existing} bytes ({share:.1} % of the volume); --spare-percent {percent} asks for {wanted}: omit --spare-percent to keep the store's, or grow the volume (a larger --size with --resize) to raise it"
    )]
    SpareMismatch {
        existing: u64,
        share: f64,
        wanted: u64,
        percent: u32,
    },
    #[error(
        "a volume of {volume_size} bytes with that spare does not fit in one store (at most {} bytes): lower --size or --spare-percent",
        crate::journal::superblock::STORE_BYTES_MAX
    )]
    TooLarge { volume_size: u64 },
    #[error(
        "the device is {actual} bytes but this volume's layout needs {needed}: lower --size or --spare-percent"
    )]
    DeviceTooSmall { actual: u64, needed: u64 },
    #[error("truncated: the store is {actual} bytes but its layout needs {needed}")]
    Truncated { actual: u64, needed: u64 },
    #[error("cannot reserve {bytes} bytes for a new store: {source} (--sparse grows it on demand)")]
    Reserve { bytes: u64, source: io::Error },
    #[error("recovery: {0}")]
    Recovery(#[from] RecoveryError),
    #[error("recovered extent map does not fit the data area: {0}")]
    Inconsistent(&'static str),
}

/// An opened copy and the descriptor its IO goes through.
pub struct OpenedCopy {
    pub file: File,
    pub direct: bool,
    pub copy: VolumeCopy,
    pub created: bool,
}

/// Opens `path` (creating it when missing or empty) as the store of volume `name`.
pub fn open_copy(
    path: &Path,
    name: &str,
    size: Option<u64>,
    resize: bool,
    durability: Durability,
    preallocate_store: bool,
    spare_percent: Option<u32>,
) -> Result<OpenedCopy, OpenError> {
    let error = |problem: Problem| OpenError {
        path: path.to_path_buf(),
        problem,
    };
    let io_error = |source: io::Error| error(Problem::Io(source));
    let (file, direct) = open_backing(path).map_err(io_error)?;
    let metadata = file.metadata().map_err(io_error)?;
    let is_device = metadata.file_type().is_block_device();
    let actual = store_size(&file, is_device).map_err(io_error)?;

    // A separate buffered descriptor for start-up reads: no alignment rules, and the reads are one-off.
    let reader = File::open(path).map_err(io_error)?;
    let mut first = [0u8; SUPERBLOCK_BYTES];
    // Only an empty file, or a block device whose first sector is zero, is formatted: anything else
    // must carry our superblock, so that a user's disk image is never overwritten by mistake.
    let first_sector_zero =
        read_exact_at(&reader, &mut first, 0).is_ok() && first.iter().all(|&byte| byte == 0);
    let fresh = actual == 0 || (is_device && first_sector_zero);
    let mut created = false;
    let mut superblock = if fresh {
        let volume_size = size.unwrap_or(DEFAULT_VOLUME_SIZE);
        let Some(superblock) = Superblock::new_layout(
            random_volume_id().map_err(io_error)?,
            name,
            volume_size,
            spare_percent,
        ) else {
            if !is_device {
                // `open_backing` created it empty for this volume: leave nothing behind.
                drop(file);
                let _ = std::fs::remove_file(path);
            }
            return Err(error(Problem::TooLarge { volume_size }));
        };
        if is_device {
            if actual < superblock.store_bytes() {
                return Err(error(Problem::DeviceTooSmall {
                    actual,
                    needed: superblock.store_bytes(),
                }));
            }
        } else {
            file.set_len(superblock.store_bytes()).map_err(io_error)?;
            if preallocate_store && let Err(source) = preallocate(&file, superblock.store_bytes()) {
                drop(file);
                let _ = std::fs::remove_file(path);
                return Err(error(Problem::Reserve {
                    bytes: superblock.store_bytes(),
                    source,
                }));
            }
        }
        // A new store must not show stale journal blocks: they carry another volume id, which recovery
        // ignores, so only the superblock needs writing.
        write_superblock(&reader, path, &superblock).map_err(io_error)?;
        // After the superblock: a crash while zeroing leaves a valid, empty store.
        if !is_device
            && preallocate_store
            && direct
            && let Err(source) = write_journal_zeros(&file, &superblock)
        {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(error(Problem::Reserve {
                bytes: superblock.store_bytes(),
                source,
            }));
        }
        created = true;
        tracing::info!(path = %path.display(), volume = name, size_bytes = volume_size, "created volume");
        superblock
    } else {
        Superblock::decode(&first).map_err(|problem| error(problem.into()))?
    };
    if superblock.name != name {
        return Err(error(Problem::WrongVolume {
            found: superblock.name.clone(),
            wanted: name.to_owned(),
        }));
    }
    if let Some(wanted) = size.filter(|&wanted| wanted != superblock.volume_size) {
        if !(resize && wanted > superblock.volume_size) {
            return Err(error(Problem::SizeMismatch {
                existing: superblock.volume_size,
                wanted,
            }));
        }
        superblock =
            grow(&reader, path, superblock, wanted, spare_percent, is_device).map_err(&error)?;
    } else if let Some(percent) = spare_percent {
        // The data area is laid out when the volume is created (or grown): refuse rather than
        // ignore a spare the store does not have.
        let wanted = spare_bytes_for(superblock.volume_size, Some(percent));
        let existing = superblock.spare_bytes();
        if existing.abs_diff(wanted) >= JOURNAL_BLOCK_BYTES as u64 {
            return Err(error(Problem::SpareMismatch {
                existing,
                share: existing as f64 * 100.0 / superblock.volume_size as f64,
                wanted,
                percent,
            }));
        }
    }
    let actual = store_size(&file, is_device).map_err(io_error)?;
    if actual < superblock.store_bytes() {
        return Err(error(Problem::Truncated {
            actual,
            needed: superblock.store_bytes(),
        }));
    }

    let started = Instant::now();
    let recovered = if created {
        // Nothing to replay; skipping the scan keeps creating a large volume instant.
        recovery::Recovered::empty()
    } else {
        let mut read_at = |address: u64, buffer: &mut [u8]| read_exact_at(&reader, buffer, address);
        recovery::recover(&superblock, &mut read_at).map_err(|problem| error(problem.into()))?
    };
    // Checked before anything is written: a store that is refused is left as it was.
    let allocator = allocator_for(&superblock, &recovered.map)
        .map_err(|problem| error(Problem::Inconsistent(problem)))?;
    if !created {
        // Through a buffered descriptor (no alignment rules), durable before any new write.
        let mut read_at = |address: u64, buffer: &mut [u8]| read_exact_at(&reader, buffer, address);
        let writer = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_error)?;
        recovered
            .prepare_store(&superblock, &mut read_at, &mut |address, data| {
                writer.write_all_at(data, address)
            })
            .and_then(|()| writer.sync_data())
            .map_err(io_error)?;
    }
    if direct {
        drop_cached_pages(&reader, path);
    }
    tracing::info!(
        path = %path.display(),
        committed_op = recovered.committed_op,
        extents = recovered.map.extent_count(),
        journal_blocks = recovered.blocks_replayed,
        notes_dropped = recovered.notes_dropped,
        inline_notes_copied = recovered.home_copies.len(),
        checkpoint = recovered.checkpoint_id,
        elapsed_ms = started.elapsed().as_millis() as u64,
        direct,
        "volume recovered"
    );
    let mut copy = VolumeCopy::new(superblock, recovered, allocator, durability);
    if !direct {
        copy.one_sync_at_a_time();
    }
    Ok(OpenedCopy {
        file,
        direct,
        copy,
        created,
    })
}

/// The data-area allocator of a recovered map: every extent's data space taken. Refuses a map that
/// points outside the data area or whose extents share data space (recovery checked each record, not
/// how records relate).
pub fn allocator_for(superblock: &Superblock, map: &ExtentMap) -> Result<Allocator, &'static str> {
    let mut allocator = Allocator::new(superblock.data_bytes);
    for extent in map.iter() {
        if let Location::Data(address) = extent.location {
            if address
                .checked_add(extent.length)
                .is_none_or(|end| end > superblock.data_bytes)
            {
                return Err("an extent points outside the data area");
            }
            let piece = Piece {
                address,
                length: extent.length,
            };
            if !allocator.is_free(piece) {
                return Err("two extents share the same data space");
            }
            allocator.mark_used(piece);
        }
    }
    Ok(allocator)
}

/// Reprovisioning in place: makes `copy`, whose store is `file`, an empty copy of the same volume
/// (same name, size and layout; the file or block device is kept). The copy must be idle.
///
/// The one write is the superblock sector, with a new volume id, synced before the copy changes in
/// memory. Recovery takes only journal blocks carrying the superblock's volume id, so the old journal
/// is void from the moment that sector is durable, with nothing to erase. The sector is written
/// atomically (one 512-byte sector, as at creation): a crash before it is durable leaves the old copy,
/// after it the empty one, never a mix. The caller records the copy as incomplete (durably) first, so
/// that either one restarts as a copy to be caught up, never as an in-sync slave.
///
/// Blocks its thread for one sector write and one `fdatasync` (a rare operation, like the authority).
pub fn reset_copy(file: &File, copy: &mut VolumeCopy) -> io::Result<()> {
    assert!(copy.is_idle(), "a copy is reset only when idle");
    let old = copy.superblock().clone();
    // The superblock's region ends where the journal starts: one aligned write covers it (O_DIRECT).
    let region = usize::try_from(old.journal_offset).unwrap_or(usize::MAX);
    assert!(
        region >= IO_ALIGNMENT,
        "the superblock region is at least one IO alignment unit"
    );
    let mut volume_id = random_volume_id()?;
    while volume_id == old.volume_id {
        volume_id = random_volume_id()?;
    }
    let superblock = Superblock {
        volume_id,
        ..old.clone()
    };
    let mut sector = AlignedBuf::with_capacity(IO_ALIGNMENT);
    sector.set_len(IO_ALIGNMENT);
    sector.as_mut_slice().fill(0);
    sector.as_mut_slice()[..SUPERBLOCK_BYTES].copy_from_slice(&superblock.encode());
    file.write_all_at(sector.as_slice(), 0)?;
    file.sync_data()?;
    tracing::info!(
        volume = %old.name,
        old_volume_id = old.volume_id,
        new_volume_id = volume_id,
        "store reset in place to an empty copy"
    );
    copy.reset(superblock);
    Ok(())
}

fn grow(
    reader: &File,
    path: &Path,
    old: Superblock,
    wanted: u64,
    spare_percent: Option<u32>,
    is_device: bool,
) -> Result<Superblock, Problem> {
    // The journal stays where it is; the data area grows at the end, so every existing location holds.
    // The spare never shrinks: the one asked for (or the default) for the new size, or the old one.
    let mut grown = old.clone();
    grown.volume_size = wanted;
    let spare = spare_bytes_for(wanted, spare_percent).max(old.spare_bytes());
    grown.data_bytes = wanted
        .checked_add(spare)
        .and_then(|bytes| bytes.checked_next_multiple_of(JOURNAL_BLOCK_BYTES as u64))
        .filter(|&bytes| {
            grown
                .data_offset
                .checked_add(bytes)
                .is_some_and(|end| end <= crate::journal::superblock::STORE_BYTES_MAX)
        })
        .ok_or(Problem::TooLarge {
            volume_size: wanted,
        })?
        .max(old.data_bytes);
    if is_device {
        let actual = store_size(reader, true)?;
        if actual < grown.store_bytes() {
            return Err(Problem::DeviceTooSmall {
                actual,
                needed: grown.store_bytes(),
            });
        }
    } else {
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(grown.store_bytes())?;
    }
    write_superblock(reader, path, &grown)?;
    tracing::info!(path = %path.display(), from = old.volume_size, to = wanted, "volume grown");
    Ok(grown)
}

fn write_superblock(_reader: &File, path: &Path, superblock: &Superblock) -> io::Result<()> {
    let writer = OpenOptions::new().write(true).open(path)?;
    writer.write_all_at(&superblock.encode(), 0)?;
    writer.sync_data()
}

fn open_backing(path: &Path) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok((file, true)),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "the file system refuses O_DIRECT; using buffered IO");
            Ok((options.open(path)?, false))
        }
        Err(error) => Err(error),
    }
}

fn store_size(file: &File, is_device: bool) -> io::Result<u64> {
    if !is_device {
        return Ok(file.metadata()?.len());
    }
    // SAFETY: lseek on our own descriptor has no memory effects.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(end as u64)
    }
}

/// Writes zeros over the journal region of a new, reserved store (then fdatasync): reserved blocks are
/// "unwritten" extents, and the first write into each would make the fdatasync after it a file system
/// metadata update. Journal blocks are rewritten in a ring, so paying that once at creation takes it
/// off the first pass of the journal: on this machine's ext4 a fresh 1 GiB volume's durable 4k writes
/// at QD1 ran at 2.5k IOPS with an unwritten journal and 4.8k once written (volume-bench, tuning.md §3).
/// Data blocks are left unwritten: they are converted on first use, as in any reserved file.
fn write_journal_zeros(file: &File, superblock: &Superblock) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let start = superblock.journal_offset;
    let end = start + superblock.journal_blocks() * JOURNAL_BLOCK_BYTES as u64;
    let mut zeros = AlignedBuf::with_capacity(CHUNK);
    zeros.set_len(CHUNK);
    zeros.as_mut_slice().fill(0);
    let mut offset = start;
    while offset < end {
        let length = (end - offset).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros.as_slice()[..length], offset)?;
        offset += length as u64;
    }
    file.sync_data()
}

/// Reserves every block of a new store (the default; `--sparse` skips it), so that writes into it never
/// allocate file system blocks, which would turn durable writes into file system journal commits
/// (measured: about half the durable write rate, bench/RESULTS.md) and could fail for lack of space.
fn preallocate(file: &File, length: u64) -> io::Result<()> {
    // SAFETY: fallocate on our own descriptor has no memory effects.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, length as libc::off_t) };
    if result != 0 {
        let error = io::Error::last_os_error();
        // Give back what a partial reservation took.
        let _ = file.set_len(0);
        return Err(error);
    }
    Ok(())
}

/// Drops the page cache the start-up reads (recovery scans the whole journal, up to 160 MiB for a 1 GiB
/// volume) and writes left behind: all of it clean by now (synced above). While a file has any cached
/// page, every O_DIRECT write to it looks up and evicts the pages of its range, before and after the
/// write (measured: 4.5 % of the reactor's time at QD32 in `invalidate_inode_pages2_range` and its
/// page-cache walk). Advice only: a failure costs speed, never data, so it is logged and ignored.
fn drop_cached_pages(file: &File, path: &Path) {
    // SAFETY: posix_fadvise on our own descriptor has no memory effects.
    let result = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if result != 0 {
        let error = io::Error::from_raw_os_error(result);
        tracing::warn!(path = %path.display(), %error, "could not drop the store's start-up pages from the page cache");
    }
}

fn read_exact_at(file: &File, buffer: &mut [u8], address: u64) -> io::Result<()> {
    file.read_exact_at(buffer, address)
}

fn random_volume_id() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes) | 1)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::io::device::Device;
    use crate::volume::{IoCompletion, IoFlags, IoKind, IoRequest, Origin};
    use std::collections::VecDeque;

    /// A device that carries out each operation at once with plain syscalls and hands the completion
    /// back on the next `settle`: enough to drive a copy on a real file in a test.
    struct FileDevice<'a> {
        file: &'a File,
        completed: VecDeque<(u32, i32)>,
        /// Fail every vectored write with EIO, writing nothing.
        fail_vectored: bool,
    }

    fn result_of(outcome: io::Result<()>, length: usize) -> i32 {
        match outcome {
            Ok(()) => length as i32,
            Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    impl Device for FileDevice<'_> {
        unsafe fn write(
            &mut self,
            tag: u32,
            address: u64,
            data: *const u8,
            length: usize,
            _dsync: bool,
        ) -> bool {
            // SAFETY: the caller keeps `[data, data + length)` valid and unchanged until the
            // completion, which is delivered after this call returns.
            let bytes = unsafe { std::slice::from_raw_parts(data, length) };
            let outcome = self.file.write_all_at(bytes, address);
            let outcome = outcome.and_then(|()| self.file.sync_data());
            self.completed.push_back((tag, result_of(outcome, length)));
            true
        }

        unsafe fn write_vectored(
            &mut self,
            tag: u32,
            address: u64,
            segments: *const libc::iovec,
            count: usize,
            _dsync: bool,
        ) -> bool {
            if self.fail_vectored {
                self.completed.push_back((tag, -libc::EIO));
                return true;
            }
            // SAFETY: the caller keeps the array and every segment valid and unchanged until the
            // completion, which is delivered after this call returns.
            let segments = unsafe { std::slice::from_raw_parts(segments, count) };
            let mut at = address;
            let mut outcome = Ok(());
            for segment in segments {
                // SAFETY: as above.
                let bytes = unsafe {
                    std::slice::from_raw_parts(segment.iov_base.cast::<u8>(), segment.iov_len)
                };
                outcome = outcome.and_then(|()| self.file.write_all_at(bytes, at));
                at += segment.iov_len as u64;
            }
            let outcome = outcome.and_then(|()| self.file.sync_data());
            self.completed
                .push_back((tag, result_of(outcome, (at - address) as usize)));
            true
        }

        unsafe fn read(&mut self, tag: u32, address: u64, data: *mut u8, length: usize) -> bool {
            // SAFETY: the caller keeps `[data, data + length)` valid and untouched until the
            // completion, which is delivered after this call returns.
            let bytes = unsafe { std::slice::from_raw_parts_mut(data, length) };
            let outcome = self.file.read_exact_at(bytes, address);
            self.completed.push_back((tag, result_of(outcome, length)));
            true
        }

        fn sync(&mut self, tag: u32) -> bool {
            let outcome = self.file.sync_data();
            self.completed.push_back((tag, result_of(outcome, 0)));
            true
        }
    }

    fn settle(copy: &mut VolumeCopy, device: &mut FileDevice<'_>) -> Vec<IoCompletion> {
        let mut done = VecDeque::new();
        for _ in 0..16 {
            copy.end_iteration(device, &mut done);
            while let Some((tag, result)) = device.completed.pop_front() {
                copy.complete(tag, result, device, &mut done);
            }
        }
        done.into()
    }

    /// A 4 KiB request of `kind` at `offset`, its buffer filled with `fill` (also used by
    /// `copy`'s tests).
    pub(in crate::volume) fn request(kind: IoKind, offset: u64, fill: u8) -> IoRequest {
        let mut buf = AlignedBuf::with_capacity(4096);
        buf.set_len(4096);
        buf.as_mut_slice().fill(fill);
        IoRequest {
            volume: 0,
            kind,
            flags: IoFlags::empty(),
            offset,
            length: 4096,
            buf,
            origin: Origin {
                reactor: 0,
                slot: 0,
                connection: 1,
                generation: 0,
            },
        }
    }

    impl<'a> FileDevice<'a> {
        fn on(file: &'a File) -> FileDevice<'a> {
            FileDevice {
                file,
                completed: VecDeque::new(),
                fail_vectored: false,
            }
        }
    }

    /// A path for a new store in a fresh temporary directory named after `test`.
    fn fresh_store(test: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("ferroblock-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("vol.fbv");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    fn read(copy: &mut VolumeCopy, device: &mut FileDevice<'_>, offset: u64) -> Vec<u8> {
        let mut done = VecDeque::new();
        copy.submit(request(IoKind::Read, offset, 0xee), device, &mut done);
        let mut completions: Vec<IoCompletion> = done.into();
        completions.extend(settle(copy, device));
        assert_eq!(completions.len(), 1);
        let completion = completions.pop().expect("one read");
        assert_eq!(completion.result, Ok(4096));
        completion.buf.as_slice().to_vec()
    }

    fn write(copy: &mut VolumeCopy, device: &mut FileDevice<'_>, offset: u64, fill: u8) {
        let mut done = VecDeque::new();
        copy.submit(request(IoKind::Write, offset, fill), device, &mut done);
        let completions: Vec<IoCompletion> = done.into_iter().chain(settle(copy, device)).collect();
        assert_eq!(completions.len(), 1);
        assert_eq!(completions[0].result, Ok(4096));
    }

    fn open(path: &Path) -> OpenedCopy {
        open_copy(
            path,
            "vol",
            Some(4 << 20),
            false,
            Durability::Fdatasync,
            false,
            None,
        )
        .expect("the store opens")
    }

    /// Writes started in one iteration land back to back (next-fit allocation) and go to the device as
    /// one vectored write; each reads back, before and after a restart.
    #[test]
    fn writes_started_together_share_one_vectored_write() {
        let (dir, path) = fresh_store("data-run");
        let offsets: Vec<u64> = (0..8u64).map(|index| (7 - index) * (64 << 10)).collect();
        let mut opened = open(&path);
        {
            let mut device = FileDevice::on(&opened.file);
            write(&mut opened.copy, &mut device, 1 << 20, 0x11);
            let before = opened.copy.stats();
            let mut done = VecDeque::new();
            for (index, &offset) in offsets.iter().enumerate() {
                let request = request(IoKind::Write, offset, 0x20 + index as u8);
                opened.copy.submit(request, &mut device, &mut done);
            }
            let completions: Vec<IoCompletion> = done
                .into_iter()
                .chain(settle(&mut opened.copy, &mut device))
                .collect();
            assert_eq!(completions.len(), offsets.len());
            assert!(completions.iter().all(|done| done.result == Ok(4096)));
            let after = opened.copy.stats();
            // The first found no note in flight (a lone writer's inline note); the seven others
            // started behind it.
            assert_eq!(after.inline_notes - before.inline_notes, 1);
            assert_eq!(after.data_runs - before.data_runs, 1, "one vectored write");
            assert_eq!(
                after.data_bytes_written - before.data_bytes_written,
                4096 * (offsets.len() as u64 - 1)
            );
            for (index, &offset) in offsets.iter().enumerate() {
                let data = read(&mut opened.copy, &mut device, offset);
                assert!(
                    data.iter().all(|&b| b == 0x20 + index as u8),
                    "offset {offset}"
                );
            }
        }
        drop(opened);
        let mut opened = open(&path);
        assert_eq!(opened.copy.committed_op(), 1 + offsets.len() as u64);
        let mut device = FileDevice::on(&opened.file);
        for (index, &offset) in offsets.iter().enumerate() {
            let data = read(&mut opened.copy, &mut device, offset);
            assert!(
                data.iter().all(|&b| b == 0x20 + index as u8),
                "offset {offset} after recovery"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A vectored data write that fails fails every note it carried: none is acknowledged, the copy
    /// refuses writes from then on, and committed data still reads back.
    #[test]
    fn a_failed_vectored_write_fails_every_note_in_it() {
        let (dir, path) = fresh_store("data-run-eio");
        let mut opened = open(&path);
        let mut device = FileDevice::on(&opened.file);
        write(&mut opened.copy, &mut device, 1 << 20, 0x11);
        device.fail_vectored = true;
        let mut done = VecDeque::new();
        for index in 0..8u64 {
            let request = request(IoKind::Write, index * (64 << 10), 0x40 + index as u8);
            opened.copy.submit(request, &mut device, &mut done);
        }
        let completions: Vec<IoCompletion> = done
            .into_iter()
            .chain(settle(&mut opened.copy, &mut device))
            .collect();
        assert_eq!(completions.len(), 8);
        assert_eq!(
            opened.copy.stats().data_runs,
            1,
            "seven notes in one vectored write"
        );
        // The first of the eight was a lone writer's inline note, outside the run.
        let failed = completions
            .iter()
            .filter(|done| done.result.is_err())
            .count();
        assert!(
            failed >= 7,
            "{failed} of 8 failed: every note of the run must"
        );
        device.fail_vectored = false;
        let mut done = VecDeque::new();
        opened.copy.submit(
            request(IoKind::Write, 2 << 20, 0x55),
            &mut device,
            &mut done,
        );
        let completions: Vec<IoCompletion> = done
            .into_iter()
            .chain(settle(&mut opened.copy, &mut device))
            .collect();
        assert!(
            completions[0].result.is_err(),
            "a failed copy refuses writes"
        );
        assert!(
            read(&mut opened.copy, &mut device, 1 << 20)
                .iter()
                .all(|&b| b == 0x11)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// After every `end_iteration` nothing is left unissued, also when requests that waited (the first
    /// writes after a restart wait for a block vouching for the recovered journal) start from inside
    /// it: a reactor sleeps after `end_iteration`, and a data write still gathered then would never be
    /// issued.
    #[test]
    fn end_iteration_leaves_nothing_unissued() {
        let (dir, path) = fresh_store("unissued");
        drop(open(&path));
        let mut opened = open(&path);
        let mut device = FileDevice::on(&opened.file);
        let mut done = VecDeque::new();
        for (index, offset) in [0u64, 8192, 1 << 20].into_iter().enumerate() {
            let request = request(IoKind::Write, offset, 0x30 + index as u8);
            opened.copy.submit(request, &mut device, &mut done);
        }
        let mut acknowledged = done.len();
        for _ in 0..16 {
            opened.copy.end_iteration(&mut device, &mut done);
            assert!(!opened.copy.has_unissued_work(), "IO left unissued");
            while let Some((tag, result)) = device.completed.pop_front() {
                opened.copy.complete(tag, result, &mut device, &mut done);
            }
            acknowledged = done.len();
        }
        assert_eq!(acknowledged, 3);
        assert!(done.iter().all(|completion| completion.result == Ok(4096)));
        assert!(
            opened.copy.stats().data_runs >= 1,
            "the waiting writes went out as a run"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Reprovisioning in place on a real file: the reset copy reads as holes, is at op 0, keeps its
    /// name, size and layout, and is what a restart recovers (the old journal is void); writes after
    /// the reset are the only thing a later restart finds.
    #[test]
    fn a_reset_store_reopens_empty_with_the_same_identity() {
        let (dir, path) = fresh_store("reset");

        let mut opened = open(&path);
        let old = opened.copy.superblock().clone();
        {
            let mut device = FileDevice::on(&opened.file);
            for (index, offset) in [0u64, 8192, 1 << 20].into_iter().enumerate() {
                write(&mut opened.copy, &mut device, offset, 0xa0 + index as u8);
            }
            assert_eq!(opened.copy.committed_op(), 3);
            assert!(opened.copy.is_idle());
        }
        drop(opened);
        let mut opened = open(&path);
        assert_eq!(
            opened.copy.committed_op(),
            3,
            "the data is durable before the reset"
        );

        reset_copy(&opened.file, &mut opened.copy).expect("reset");
        let new = opened.copy.superblock().clone();
        assert_ne!(new.volume_id, old.volume_id);
        assert_eq!(
            Superblock {
                volume_id: old.volume_id,
                ..new.clone()
            },
            old,
            "same name, size and layout"
        );
        assert_eq!((opened.copy.committed_op(), opened.copy.next_op()), (0, 1));
        assert!(opened.copy.changed_since(0).is_empty());
        {
            let mut device = FileDevice::on(&opened.file);
            for offset in [0u64, 8192, 1 << 20] {
                assert!(
                    read(&mut opened.copy, &mut device, offset)
                        .iter()
                        .all(|&b| b == 0)
                );
            }
        }
        drop(opened);

        // A restart finds the empty copy: no old journal block is replayed.
        let mut opened = open(&path);
        assert_eq!(opened.copy.superblock(), &new);
        assert_eq!(opened.copy.committed_op(), 0);
        assert!(opened.copy.changed_since(0).is_empty());
        {
            let mut device = FileDevice::on(&opened.file);
            write(&mut opened.copy, &mut device, 8192, 0x77);
        }
        drop(opened);
        let mut opened = open(&path);
        assert_eq!(opened.copy.committed_op(), 1);
        let mut device = FileDevice::on(&opened.file);
        assert!(
            read(&mut opened.copy, &mut device, 8192)
                .iter()
                .all(|&b| b == 0x77)
        );
        assert!(
            read(&mut opened.copy, &mut device, 0)
                .iter()
                .all(|&b| b == 0)
        );
        assert!(
            read(&mut opened.copy, &mut device, 1 << 20)
                .iter()
                .all(|&b| b == 0)
        );
        drop(device);
        drop(opened);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Lone writes become inline notes (data in the journal, one write each): reads are served from
    /// the home batch before it is written, and a restart that finds the homes never written copies
    /// them from the journal (`Recovered::prepare_store`).
    #[test]
    fn inline_notes_read_back_and_are_copied_home_by_recovery() {
        let (dir, path) = fresh_store("inline");

        let mut opened = open(&path);
        {
            let mut device = FileDevice::on(&opened.file);
            // The first write is not inline: no block has shown a lone writer yet.
            for (offset, fill) in [(0u64, 0xa1u8), (8192, 0xa2), (1 << 20, 0xa3), (0, 0xa4)] {
                write(&mut opened.copy, &mut device, offset, fill);
            }
            let stats = opened.copy.stats();
            assert_eq!(stats.inline_notes, 3);
            assert_eq!(
                stats.data_bytes_written, 4096,
                "only the first write's data; no home yet"
            );
            for (offset, fill) in [(0u64, 0xa4u8), (8192, 0xa2), (1 << 20, 0xa3)] {
                assert!(
                    read(&mut opened.copy, &mut device, offset)
                        .iter()
                        .all(|&b| b == fill)
                );
            }
        }
        drop(opened);
        let mut opened = open(&path);
        assert_eq!(opened.copy.committed_op(), 4);
        let mut device = FileDevice::on(&opened.file);
        for (offset, fill) in [(0u64, 0xa4u8), (8192, 0xa2), (1 << 20, 0xa3)] {
            assert!(
                read(&mut opened.copy, &mut device, offset)
                    .iter()
                    .all(|&b| b == fill),
                "offset {offset} after recovery"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// How many pages of `file` the page cache holds (mincore over a read-only shared mapping, which
    /// faults nothing in).
    fn cached_pages(file: &File) -> usize {
        let length = file.metadata().expect("metadata").len() as usize;
        // SAFETY: a fresh read-only shared mapping of our own descriptor, never dereferenced, unmapped
        // below; mincore writes one byte per page into `resident`, which has room for every page.
        unsafe {
            let address = libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(address, libc::MAP_FAILED, "mmap of the store");
            let mut resident = vec![0u8; length.div_ceil(4096)];
            let result = libc::mincore(address, length, resident.as_mut_ptr());
            libc::munmap(address, length);
            assert_eq!(result, 0, "mincore of the store");
            resident.iter().filter(|&&page| page & 1 != 0).count()
        }
    }

    /// Recovery reads the journal through the page cache; an O_DIRECT store leaves none of it there,
    /// since every direct write to a file with cached pages pays a page-cache walk.
    #[test]
    fn an_opened_store_leaves_no_page_cache() {
        let (dir, path) = fresh_store("page-cache");
        let mut opened = open(&path);
        {
            let mut device = FileDevice::on(&opened.file);
            for index in 0..16u64 {
                write(&mut opened.copy, &mut device, index * 8192, index as u8);
            }
        }
        drop(opened);
        let reopened = open(&path);
        assert_eq!(reopened.copy.committed_op(), 16);
        if reopened.direct {
            assert_eq!(cached_pages(&reopened.file), 0);
        } else {
            eprintln!(
                "{}: the file system refuses O_DIRECT; nothing to check",
                path.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
