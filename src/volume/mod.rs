//! Volumes: the block devices that front-ends export.
//!
//! Owns: the typed IO requests a front-end sends to a volume and the completions it gets back, and the
//! dispatch of each request to the volume's store. A volume lives on exactly one reactor, which is the only
//! thread that ever touches it; other reactors reach it through rings (see `reactor`).
//! Must never: see protocol bytes (front-ends validate and translate), block the reactor, or acknowledge an
//! IO its store did not complete.
//!
//! This volume is a plain store (memory or a raw file). Notes, op numbers and commit arrive with
//! the persistent volume copy; the request/completion interface stays.

use std::collections::VecDeque;

use bitflags::bitflags;

pub mod copy;
pub mod open;
pub mod replica;
#[cfg(test)]
mod sim;

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::io::AlignedBuf;
use crate::io::device::UringDevice;
use crate::io::file::FileStore;
use crate::io::memory::MemoryStore;
use crate::io::uring::Uring;

/// Index of a volume in the server's export table.
pub type VolumeId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

bitflags! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IoFlags: u8 {
        /// Durable before completion (NBD FUA).
        const FUA = 1 << 0;
        /// Write-zeroes must leave the range allocated.
        const NO_HOLE = 1 << 1;
        /// Write-zeroes must fail rather than be slow.
        const FAST_ZERO = 1 << 2;
        /// Block status: one extent is enough.
        const ONE_EXTENT = 1 << 3;
    }
}

/// Who is waiting for a request: enough to route its completion back without any lookup table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub reactor: u16,
    pub slot: u16,
    pub connection: u32,
    pub generation: u32,
}

impl Origin {
    /// The origin of requests a replication peer makes (notes applied on a slave, catch-up extents):
    /// no host waits for them. The server recognises it (`is_replication`) and drops or routes their
    /// completions itself; a connection table never holds index `u32::MAX`, so one that reaches it
    /// by mistake is dropped like a completion for a closed connection.
    pub const REPLICATION: Origin = Origin {
        reactor: 0,
        slot: 0,
        connection: u32::MAX,
        generation: u32::MAX,
    };

    /// The origin of an applied note: `REPLICATION`, with the low 32 bits of its op as generation
    /// (for traces and tests; the server needs nothing but `is_replication`).
    pub const fn replication(op: u64) -> Origin {
        Origin {
            generation: op as u32,
            ..Origin::REPLICATION
        }
    }

    pub fn is_replication(&self) -> bool {
        self.connection == u32::MAX
    }
}

/// A validated IO request. Offsets and lengths are within the volume and multiples of the sector size.
#[derive(Debug)]
pub struct IoRequest {
    pub volume: VolumeId,
    pub kind: IoKind,
    pub flags: IoFlags,
    pub offset: u64,
    pub length: u32,
    /// Write data (len == length), or room for read data (len == length) or block-status extents.
    pub buf: AlignedBuf,
    pub origin: Origin,
}

/// How an IO failed, in the store's terms. Front-ends map these to their protocol's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("device IO error (errno {0})")]
    Io(i32),
    #[error("no space left on the device")]
    NoSpace,
    #[error("operation not supported by this store")]
    NotSupported,
    #[error("invalid request")]
    Invalid,
    /// The note was dropped before it committed: this copy lost its mastership (or dropped what it
    /// had not committed on behalf of the replication protocol). Its outcome is unknown to the host.
    #[error("dropped uncommitted: this copy was fenced")]
    Fenced,
}

impl VolumeError {
    /// From a negative io_uring result or a positive errno.
    pub fn from_errno(errno: i32) -> VolumeError {
        match errno.abs() {
            libc::ENOSPC | libc::EDQUOT => VolumeError::NoSpace,
            libc::EOPNOTSUPP => VolumeError::NotSupported,
            libc::EINVAL => VolumeError::Invalid,
            other => VolumeError::Io(other),
        }
    }
}

#[derive(Debug)]
pub struct IoCompletion {
    pub origin: Origin,
    /// For block status, the number of extents written into `buf`; otherwise the bytes transferred.
    pub result: Result<u32, VolumeError>,
    pub buf: AlignedBuf,
}

/// Size of one block-status extent record in a completion buffer: length (u32) then flags (u32), native
/// endian. The flags use the NBD `base:allocation` bit values (`EXTENT_HOLE`, `EXTENT_ZERO`).
pub const EXTENT_RECORD_LEN: usize = 8;
pub const EXTENT_HOLE: u32 = 1;
pub const EXTENT_ZERO: u32 = 2;
/// Most extents one block-status answer carries; the client asks again for the rest.
pub const EXTENTS_PER_REPLY_MAX: usize = 1024;

/// Appends an extent to a block-status buffer, merging with the previous one when the flags match.
/// Returns false when the buffer is full.
pub fn push_extent(buf: &mut AlignedBuf, count: &mut u32, length: u64, flags: u32) -> bool {
    debug_assert!(length > 0 && length <= u64::from(u32::MAX));
    let at = *count as usize * EXTENT_RECORD_LEN;
    if *count > 0 {
        let previous = &mut buf.as_mut_slice()[at - EXTENT_RECORD_LEN..at];
        let previous_flags = u32::from_ne_bytes(previous[4..8].try_into().expect("4 bytes"));
        let previous_length = u64::from(u32::from_ne_bytes(
            previous[0..4].try_into().expect("4 bytes"),
        ));
        if previous_flags == flags && previous_length + length <= u64::from(u32::MAX - 4095) {
            previous[0..4].copy_from_slice(&((previous_length + length) as u32).to_ne_bytes());
            return true;
        }
    }
    if at + EXTENT_RECORD_LEN > buf.len() {
        return false;
    }
    let record = &mut buf.as_mut_slice()[at..at + EXTENT_RECORD_LEN];
    record[0..4].copy_from_slice(&(length as u32).to_ne_bytes());
    record[4..8].copy_from_slice(&flags.to_ne_bytes());
    *count += 1;
    true
}

/// Where a volume's blocks live.
pub enum Store {
    /// Sparse memory, lost at exit.
    Memory(MemoryStore),
    /// Stores nothing: writes are dropped, reads return zeros.
    Null,
    /// A raw image file or device, block for block (no notes): for comparison with plain file servers.
    Raw(FileStore),
    /// A persistent volume copy: notes, op numbers, commits, crash recovery.
    /// (Boxed: the copy is large and the enum is moved around at start-up.)
    Persistent {
        copy: Box<copy::VolumeCopy>,
        file: File,
    },
}

pub struct Volume {
    pub id: VolumeId,
    pub size_bytes: u64,
    store: Store,
    /// A replicated volume serves hosts only as its replication peer allows (`replica`).
    gate: Option<ServingGate>,
}

/// What a replicated volume may serve now, set by its replication peer every reactor iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingGate {
    pub writes: bool,
    pub reads: bool,
}

impl Volume {
    pub fn new(id: VolumeId, size_bytes: u64, store: Store) -> Volume {
        Volume {
            id,
            size_bytes,
            store,
            gate: None,
        }
    }

    /// Starts an IO. Memory completes at once into `done`; the file store submits to `uring` and
    /// completes when `complete` is called with the kernel's result.
    pub fn submit(
        &mut self,
        request: IoRequest,
        uring: &mut Uring,
        done: &mut VecDeque<IoCompletion>,
    ) {
        debug_assert_eq!(request.volume, self.id);
        debug_assert!(request.offset + u64::from(request.length) <= self.size_bytes);
        if let Some(gate) = self.gate {
            let allowed = match request.kind {
                IoKind::Read | IoKind::BlockStatus | IoKind::Cache => gate.reads,
                IoKind::Write | IoKind::Trim | IoKind::WriteZeroes | IoKind::Flush => gate.writes,
            };
            if !allowed {
                // Not (or no longer) this volume's serving master: nothing is read or applied.
                done.push_back(IoCompletion {
                    origin: request.origin,
                    result: Err(VolumeError::Io(libc::EIO)),
                    buf: request.buf,
                });
                return;
            }
        }
        match &mut self.store {
            Store::Memory(memory) => done.push_back(memory.execute(request)),
            Store::Null => done.push_back(null_execute(request)),
            Store::Raw(file) => file.submit(request, uring, done),
            Store::Persistent { copy, file } => {
                let mut device = UringDevice {
                    uring,
                    fd: file.as_raw_fd(),
                    volume: self.id,
                };
                copy.submit(request, &mut device, done);
            }
        }
    }

    /// End of a reactor iteration: a persistent copy writes the batch of notes gathered in it.
    pub fn end_iteration(&mut self, uring: &mut Uring, done: &mut VecDeque<IoCompletion>) {
        if let Store::Persistent { copy, file } = &mut self.store {
            let mut device = UringDevice {
                uring,
                fd: file.as_raw_fd(),
                volume: self.id,
            };
            copy.end_iteration(&mut device, done);
        }
    }

    /// Hands a persistent copy's gathered data writes to the ring now (`VolumeCopy::push_gathered_writes`).
    pub fn push_gathered_writes(&mut self, uring: &mut Uring) {
        if let Store::Persistent { copy, file } = &mut self.store {
            let mut device = UringDevice {
                uring,
                fd: file.as_raw_fd(),
                volume: self.id,
            };
            copy.push_gathered_writes(&mut device);
        }
    }

    /// Feeds a kernel completion (tagged with this volume's id) back to the store.
    pub fn complete(
        &mut self,
        tag: u32,
        result: i32,
        uring: &mut Uring,
        done: &mut VecDeque<IoCompletion>,
    ) {
        match &mut self.store {
            Store::Memory(_) | Store::Null => {
                debug_assert!(false, "memory volumes submit no kernel IO")
            }
            Store::Raw(file) => file.complete(tag, result, uring, done),
            Store::Persistent { copy, file } => {
                let mut device = UringDevice {
                    uring,
                    fd: file.as_raw_fd(),
                    volume: self.id,
                };
                copy.complete(tag, result, &mut device, done);
            }
        }
    }

    /// Requests handed to the kernel and not completed yet.
    pub fn in_flight(&self) -> usize {
        match &self.store {
            Store::Memory(_) | Store::Null => 0,
            Store::Raw(file) => file.in_flight(),
            Store::Persistent { copy, .. } => copy.in_flight(),
        }
    }

    /// Whether the store holds IO it has not handed to the device yet (see
    /// `VolumeCopy::has_unissued_work`): the reactor runs another iteration before sleeping.
    pub fn has_unissued_work(&self) -> bool {
        match &self.store {
            Store::Persistent { copy, .. } => copy.has_unissued_work(),
            _ => false,
        }
    }

    /// A persistent copy's op numbers and counters.
    pub fn copy_stats(&self) -> Option<copy::CopyStats> {
        match &self.store {
            Store::Persistent { copy, .. } => Some(copy.stats()),
            _ => None,
        }
    }

    /// Whether every connection sees the others' flushed writes (NBD multi-conn): true for every store,
    /// because every IO to a volume goes through its one owning reactor, and a flush syncs the whole
    /// store (raw), or covers every acknowledged write of the copy (persistent: at once when they are
    /// durable already, else with one sync in write-back mode).
    pub fn flush_is_global(&self) -> bool {
        true
    }
}

/// The null store: reads are zeros (the buffer is cleared: it may hold another request's data), writes
/// vanish, everything else succeeds at once; block status says "data" everywhere.
fn null_execute(mut request: IoRequest) -> IoCompletion {
    let result = match request.kind {
        IoKind::Read => {
            request.buf.as_mut_slice().fill(0);
            Ok(request.length)
        }
        IoKind::BlockStatus => {
            request.buf.set_len(EXTENT_RECORD_LEN);
            let mut count = 0;
            push_extent(&mut request.buf, &mut count, u64::from(request.length), 0);
            Ok(count)
        }
        _ => Ok(request.length),
    };
    IoCompletion {
        origin: request.origin,
        result,
        buf: request.buf,
    }
}

/// Gets a request to the reactor that owns its volume (directly, or through a ring). Implemented by the
/// reactor; front-ends only see this.
pub trait SubmitIo {
    fn submit(&mut self, request: IoRequest);
}
