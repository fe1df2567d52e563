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
use crate::btree::{Location, Piece};
use crate::journal::recovery::{self, RecoveryError};
use crate::journal::superblock::{SUPERBLOCK_BYTES, Superblock, SuperblockError};
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
        let superblock =
            Superblock::new_layout(random_volume_id().map_err(io_error)?, name, volume_size);
        if is_device {
            if actual < superblock.store_bytes() {
                return Err(error(Problem::Truncated {
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
        superblock = grow(&reader, path, superblock, wanted, is_device).map_err(&error)?;
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
    let mut allocator = Allocator::new(superblock.data_bytes);
    for extent in recovered.map.iter() {
        if let Location::Data(address) = extent.location {
            if address
                .checked_add(extent.length)
                .is_none_or(|end| end > superblock.data_bytes)
            {
                return Err(error(Problem::Inconsistent(
                    "an extent points outside the data area",
                )));
            }
            let piece = Piece {
                address,
                length: extent.length,
            };
            if !allocator.is_free(piece) {
                return Err(error(Problem::Inconsistent(
                    "two extents share the same data space",
                )));
            }
            allocator.mark_used(piece);
        }
    }
    tracing::info!(
        path = %path.display(),
        committed_op = recovered.committed_op,
        extents = recovered.map.extent_count(),
        journal_blocks = recovered.blocks_replayed,
        notes_dropped = recovered.notes_dropped,
        checkpoint = recovered.checkpoint_id,
        elapsed_ms = started.elapsed().as_millis() as u64,
        direct,
        "volume recovered"
    );
    let copy = VolumeCopy::new(superblock, recovered, allocator, durability);
    Ok(OpenedCopy {
        file,
        direct,
        copy,
        created,
    })
}

fn grow(
    reader: &File,
    path: &Path,
    old: Superblock,
    wanted: u64,
    is_device: bool,
) -> Result<Superblock, Problem> {
    // The journal stays where it is; the data area grows at the end, so every existing location holds.
    let mut grown = old.clone();
    grown.volume_size = wanted;
    grown.data_bytes = crate::journal::superblock::data_bytes_for(wanted).max(old.data_bytes);
    if is_device {
        let actual = store_size(reader, true)?;
        if actual < grown.store_bytes() {
            return Err(Problem::Truncated {
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

fn read_exact_at(file: &File, buffer: &mut [u8], address: u64) -> io::Result<()> {
    file.read_exact_at(buffer, address)
}

fn random_volume_id() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes) | 1)
}
