//! The device interface a volume copy drives: positioned reads and writes and a barrier, submitted now
//! and completed later by tag. The reactor implements it with io_uring; tests implement it with a
//! simulated disk that can lose its volatile cache at a "power cut".
//!
//! Must never: complete an operation before the kernel (or simulator) did, or reorder a sync before the
//! writes that completed ahead of its submission.

use std::os::fd::RawFd;

use io_uring::{opcode, types};

use crate::io::uring::Uring;
use crate::volume::VolumeId;

pub trait Device {
    /// Queues a write; false when the device cannot take it now (the caller retries later).
    ///
    /// # Safety
    /// `[data, data + length)` must stay valid and unchanged until the completion for `tag` is delivered.
    unsafe fn write(
        &mut self,
        tag: u32,
        address: u64,
        data: *const u8,
        length: usize,
        dsync: bool,
    ) -> bool;

    /// Queues one write of `count` buffers (`segments`, an iovec array), in order, to consecutive
    /// addresses from `address` (writev); false when the device cannot take it now.
    ///
    /// # Safety
    /// Every segment, and the array itself, must stay valid and unchanged until the completion for
    /// `tag` is delivered.
    unsafe fn write_vectored(
        &mut self,
        tag: u32,
        address: u64,
        segments: *const libc::iovec,
        count: usize,
        dsync: bool,
    ) -> bool;

    /// Queues a read; false when the device cannot take it now.
    ///
    /// # Safety
    /// `[data, data + length)` must stay valid and otherwise untouched until the completion for `tag`.
    unsafe fn read(&mut self, tag: u32, address: u64, data: *mut u8, length: usize) -> bool;

    /// Queues a barrier making every write completed before it durable (fdatasync).
    fn sync(&mut self, tag: u32) -> bool;
}

/// A file or block device driven through the reactor's io_uring. Completions come back through the
/// reactor as `(volume << 32 | tag, result)`.
pub struct UringDevice<'a> {
    pub uring: &'a mut Uring,
    pub fd: RawFd,
    pub volume: VolumeId,
}

impl UringDevice<'_> {
    fn user_data(&self, tag: u32) -> u64 {
        (u64::from(self.volume) << 32) | u64::from(tag)
    }
}

impl Device for UringDevice<'_> {
    unsafe fn write(
        &mut self,
        tag: u32,
        address: u64,
        data: *const u8,
        length: usize,
        dsync: bool,
    ) -> bool {
        let entry = opcode::Write::new(types::Fd(self.fd), data, length as u32)
            .offset(address)
            .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
            .build()
            .user_data(self.user_data(tag));
        // SAFETY: the caller keeps the buffer valid until the completion, as this function requires.
        unsafe { self.uring.push(&entry) }
    }

    unsafe fn write_vectored(
        &mut self,
        tag: u32,
        address: u64,
        segments: *const libc::iovec,
        count: usize,
        dsync: bool,
    ) -> bool {
        let entry = opcode::Writev::new(types::Fd(self.fd), segments, count as u32)
            .offset(address)
            .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
            .build()
            .user_data(self.user_data(tag));
        // SAFETY: the caller keeps the array and its buffers valid until the completion, as this
        // function requires.
        unsafe { self.uring.push(&entry) }
    }

    unsafe fn read(&mut self, tag: u32, address: u64, data: *mut u8, length: usize) -> bool {
        let entry = opcode::Read::new(types::Fd(self.fd), data, length as u32)
            .offset(address)
            .build()
            .user_data(self.user_data(tag));
        // SAFETY: as for `write`.
        unsafe { self.uring.push(&entry) }
    }

    fn sync(&mut self, tag: u32) -> bool {
        let entry = opcode::Fsync::new(types::Fd(self.fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(self.user_data(tag));
        // SAFETY: fsync references no memory.
        unsafe { self.uring.push_worker_op(&entry) }
    }
}
