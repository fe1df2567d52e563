//! Raw file or block device store, driven through the owning reactor's io_uring.
//!
//! Owns: the backing descriptor (O_DIRECT when the file system allows it), the table of requests the kernel
//! holds, and the requests parked while the ring is full. Must never: complete a write as successful before
//! the kernel reported all of its bytes written, or free a buffer the kernel still holds (requests live in
//! `in_flight` from submission to completion).
//!
//! Durability: FUA writes use RWF_DSYNC; FUA trims and zeroes are followed by fdatasync; FLUSH is fdatasync.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types};

use crate::io::uring::Uring;
use crate::volume::{
    EXTENT_HOLE, EXTENT_RECORD_LEN, EXTENT_ZERO, EXTENTS_PER_REPLY_MAX, IoCompletion, IoFlags,
    IoKind, IoRequest, VolumeError, VolumeId, push_extent,
};

#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{path}: the backing file is {actual} bytes but --size asks for {wanted}; refusing to change it"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
}

/// What the kernel is doing for a request right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Main,
    /// The main operation finished; an fdatasync for FUA is running.
    SyncAfter,
}

struct InFlight {
    request: IoRequest,
    phase: Phase,
}

pub struct FileStore {
    file: File,
    volume: VolumeId,
    direct: bool,
    in_flight: Vec<Option<InFlight>>,
    free_tags: Vec<u32>,
    parked: VecDeque<IoRequest>,
}

/// Requests one store keeps in the kernel at most (the ring is shared by the reactor's volumes).
const IN_FLIGHT_MAX: usize = 256;

impl FileStore {
    /// Opens (creating or extending a new, empty file to `size_bytes`) a regular file or a block device.
    pub fn open(
        path: &Path,
        size_bytes: u64,
        volume: VolumeId,
    ) -> Result<FileStore, FileStoreError> {
        let open_error = |source| FileStoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let (file, direct) = match open_backing(path, true) {
            Ok(file) => (file, true),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "the file system refuses O_DIRECT; falling back to buffered IO (FUA and FLUSH still sync)"
                );
                (open_backing(path, false).map_err(open_error)?, false)
            }
            Err(error) => return Err(open_error(error)),
        };
        let metadata = file.metadata().map_err(open_error)?;
        let actual = if metadata.file_type().is_block_device() {
            device_size(&file).map_err(open_error)?
        } else {
            metadata.len()
        };
        if actual == 0 && !metadata.file_type().is_block_device() {
            file.set_len(size_bytes).map_err(open_error)?;
        } else if actual != size_bytes {
            return Err(FileStoreError::SizeMismatch {
                path: path.to_path_buf(),
                actual,
                wanted: size_bytes,
            });
        }
        Ok(FileStore {
            file,
            volume,
            direct,
            in_flight: (0..IN_FLIGHT_MAX).map(|_| None).collect(),
            free_tags: (0..IN_FLIGHT_MAX as u32).rev().collect(),
            parked: VecDeque::with_capacity(IN_FLIGHT_MAX),
        })
    }

    /// Whether IO bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn in_flight(&self) -> usize {
        IN_FLIGHT_MAX - self.free_tags.len() + self.parked.len()
    }

    pub fn submit(
        &mut self,
        request: IoRequest,
        uring: &mut Uring,
        done: &mut VecDeque<IoCompletion>,
    ) {
        match request.kind {
            // O_DIRECT bypasses the cache, and buffered reads would be served by the kernel anyway.
            IoKind::Cache => done.push_back(IoCompletion {
                origin: request.origin,
                result: Ok(0),
                buf: request.buf,
            }),
            IoKind::BlockStatus => done.push_back(self.block_status(request)),
            _ if !self.parked.is_empty() => self.parked.push_back(request),
            _ => self.start(request, uring),
        }
    }

    fn start(&mut self, request: IoRequest, uring: &mut Uring) {
        let Some(tag) = self.free_tags.pop() else {
            self.parked.push_back(request);
            return;
        };
        let slot = self.in_flight[tag as usize].insert(InFlight {
            request,
            phase: Phase::Main,
        });
        let entry =
            main_entry(&self.file, &mut slot.request).user_data(user_data(self.volume, tag));
        let on_worker = matches!(
            slot.request.kind,
            IoKind::Flush | IoKind::Trim | IoKind::WriteZeroes
        );
        let pushed = if on_worker {
            // SAFETY: the request (and its buffer) stays in `self.in_flight[tag]` until `complete` takes
            // it out after the kernel posts this entry's completion.
            unsafe { uring.push_worker_op(&entry) }
        } else {
            // SAFETY: as above.
            unsafe { uring.push(&entry) }
        };
        if !pushed {
            let parked = self.in_flight[tag as usize]
                .take()
                .expect("just inserted")
                .request;
            self.free_tags.push(tag);
            self.parked.push_front(parked);
        }
    }

    /// Handles the kernel's result for `tag`, and starts parked requests now that there is room.
    pub fn complete(
        &mut self,
        tag: u32,
        result: i32,
        uring: &mut Uring,
        done: &mut VecDeque<IoCompletion>,
    ) {
        let Some(slot) = self.in_flight.get_mut(tag as usize) else {
            debug_assert!(false, "completion for unknown tag {tag}");
            return;
        };
        let Some(mut in_flight) = slot.take() else {
            debug_assert!(false, "completion for free tag {tag}");
            return;
        };
        let request = &in_flight.request;
        let outcome = if result < 0 {
            Err(VolumeError::from_errno(result))
        } else if in_flight.phase == Phase::Main
            && matches!(request.kind, IoKind::Read | IoKind::Write)
            && result as u32 != request.length
        {
            // A short transfer inside the file's size means the device gave up part way: never report
            // success for bytes that were not moved.
            Err(VolumeError::Io(libc::EIO))
        } else {
            Ok(request.length)
        };
        let needs_sync = outcome.is_ok()
            && in_flight.phase == Phase::Main
            && request.flags.contains(IoFlags::FUA)
            && matches!(request.kind, IoKind::Trim | IoKind::WriteZeroes);
        if needs_sync {
            in_flight.phase = Phase::SyncAfter;
            let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(user_data(self.volume, tag));
            *slot = Some(in_flight);
            // SAFETY: fsync references no buffer.
            if !unsafe { uring.push_worker_op(&entry) } {
                // The slot we just freed guarantees room in the ring; treat failure as a device error.
                let in_flight = slot.take().expect("just stored");
                self.free_tags.push(tag);
                done.push_back(IoCompletion {
                    origin: in_flight.request.origin,
                    result: Err(VolumeError::Io(libc::EAGAIN)),
                    buf: in_flight.request.buf,
                });
            }
        } else {
            self.free_tags.push(tag);
            let request = in_flight.request;
            done.push_back(IoCompletion {
                origin: request.origin,
                result: outcome,
                buf: request.buf,
            });
        }
        while !self.free_tags.is_empty() && uring.has_room() {
            let Some(parked) = self.parked.pop_front() else {
                break;
            };
            self.start(parked, uring);
        }
    }

    /// Allocation status from SEEK_DATA / SEEK_HOLE: cheap metadata lookups, done inline.
    fn block_status(&mut self, mut request: IoRequest) -> IoCompletion {
        let fd = self.file.as_raw_fd();
        let one = request.flags.contains(IoFlags::ONE_EXTENT);
        let extents_max = if one { 1 } else { EXTENTS_PER_REPLY_MAX };
        request.buf.set_len(extents_max * EXTENT_RECORD_LEN);
        let end = request.offset + u64::from(request.length);
        let mut position = request.offset;
        let mut count = 0u32;
        while position < end {
            // SAFETY: lseek on our own descriptor has no memory effects.
            let data = unsafe { libc::lseek(fd, position as libc::off_t, libc::SEEK_DATA) };
            let (flags, next) = if data < 0 || data as u64 >= end {
                // ENXIO: no data after `position`; everything to the end is a hole.
                (EXTENT_HOLE | EXTENT_ZERO, end)
            } else if data as u64 > position {
                (EXTENT_HOLE | EXTENT_ZERO, data as u64)
            } else {
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd, position as libc::off_t, libc::SEEK_HOLE) };
                (
                    0,
                    if hole < 0 {
                        end
                    } else {
                        (hole as u64).min(end)
                    },
                )
            };
            // Keep extents sector-aligned even when the file system reports finer granularity.
            let next = if next < end {
                next.next_multiple_of(512).min(end)
            } else {
                end
            };
            if next <= position
                || !push_extent(&mut request.buf, &mut count, next - position, flags)
            {
                break;
            }
            position = next;
            if one {
                break;
            }
        }
        if count == 0 {
            // Lookup failed outright: report the range as data, which is always correct.
            push_extent(&mut request.buf, &mut count, end - request.offset, 0);
        }
        IoCompletion {
            origin: request.origin,
            result: Ok(count),
            buf: request.buf,
        }
    }
}

fn main_entry(file: &File, request: &mut IoRequest) -> io_uring::squeue::Entry {
    let fd = types::Fd(file.as_raw_fd());
    let length = request.length;
    match request.kind {
        IoKind::Read => opcode::Read::new(fd, request.buf.as_mut_ptr(), length)
            .offset(request.offset)
            .build(),
        IoKind::Write => {
            let rw_flags = if request.flags.contains(IoFlags::FUA) {
                libc::RWF_DSYNC
            } else {
                0
            };
            opcode::Write::new(fd, request.buf.as_mut_ptr(), length)
                .offset(request.offset)
                .rw_flags(rw_flags)
                .build()
        }
        IoKind::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        IoKind::Trim | IoKind::WriteZeroes => {
            let keep =
                request.kind == IoKind::WriteZeroes && request.flags.contains(IoFlags::NO_HOLE);
            let mode = libc::FALLOC_FL_KEEP_SIZE
                | if keep {
                    libc::FALLOC_FL_ZERO_RANGE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE
                };
            opcode::Fallocate::new(fd, u64::from(length))
                .offset(request.offset)
                .mode(mode)
                .build()
        }
        IoKind::Cache | IoKind::BlockStatus => unreachable!("completed without the kernel"),
    }
}

fn user_data(volume: VolumeId, tag: u32) -> u64 {
    (u64::from(volume) << 32) | u64::from(tag)
}

fn open_backing(path: &Path, direct: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

fn device_size(file: &File) -> io::Result<u64> {
    // SAFETY: lseek on our own descriptor has no memory effects.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(end as u64)
    }
}
