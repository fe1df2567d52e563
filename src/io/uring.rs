//! One io_uring per reactor.
//!
//! Owns: the ring, the count of operations the kernel holds, and an eventfd that the kernel signals on
//! completion so that a sleeping reactor wakes up. Must never: let the completion queue overflow (pushes
//! are refused once as many operations are in flight as the completion queue holds) or submit a buffer
//! that its owner may free before the completion (stores keep requests in an in-flight table).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{IoUring, squeue};

/// Submission queue entries per ring; the completion queue is twice as large.
pub const RING_ENTRIES: u32 = 256;

pub struct Uring {
    ring: IoUring,
    eventfd: OwnedFd,
    in_flight: usize,
    in_flight_max: usize,
    unsubmitted: usize,
    /// User data of the operations in flight that the kernel hands to an io-wq worker thread (fsync,
    /// fallocate): few at a time (at most two syncs per store), so a list.
    worker_ops: Vec<u64>,
}

impl Uring {
    pub fn new() -> io::Result<Uring> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        // SAFETY: eventfd(2) returns a new descriptor or -1; we check before taking ownership.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let in_flight_max = ring.params().cq_entries() as usize;
        Ok(Uring {
            ring,
            eventfd,
            in_flight: 0,
            in_flight_max,
            unsubmitted: 0,
            worker_ops: Vec::new(),
        })
    }

    /// Lets the kernel's io-wq workers (which run what cannot complete inline, such as fsync and
    /// RWF_DSYNC writes on most file systems) use `cpus`. Without it they inherit the pinned reactor's
    /// single core, where a busy-polling reactor starves them: a group commit then waits for the
    /// scheduler to preempt the reactor (milliseconds).
    /// Must be called from the thread that submits (io-wq is per thread); it submits a no-op first so
    /// that the thread's io-wq exists.
    pub fn set_worker_cpus(&mut self, cpus: &[usize]) -> io::Result<()> {
        let nop = io_uring::opcode::Nop::new().build().user_data(u64::MAX);
        // SAFETY: a no-op references no memory.
        if unsafe { self.ring.submission().push(&nop) }.is_ok() {
            self.ring.submit_and_wait(1)?;
            // Consume the no-op's completion so that nobody mistakes it for a real one.
            let mut completion = self.ring.completion();
            completion.sync();
            for _ in &mut completion {}
        }
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus {
            // SAFETY: as above; CPU_SET ignores CPU numbers beyond the set's size.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        self.ring.submitter().register_iowq_aff(&set)
    }

    /// The descriptor that becomes readable when completions are posted.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Resets the eventfd counter after a wake-up.
    pub fn drain_eventfd(&self) {
        let mut value = 0u64;
        // SAFETY: reading 8 bytes into a u64 on the stack from our own non-blocking eventfd.
        unsafe { libc::read(self.eventfd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether one more operation may be pushed.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.in_flight_max
    }

    /// Queues one entry (submitted at the next `submit`); false when the ring has no room, in which case
    /// the caller keeps the request and retries after completions.
    ///
    /// # Safety
    /// Every buffer the entry points to must stay valid and unmoved until its completion is reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        if !self.has_room() {
            return false;
        }
        if self.ring.submission().is_full() && self.submit().is_err() {
            return false;
        }
        // SAFETY: the caller guarantees the entry's buffers outlive the operation.
        if unsafe { self.ring.submission().push(entry) }.is_err() {
            return false;
        }
        self.in_flight += 1;
        self.unsubmitted += 1;
        true
    }

    /// `push` for an operation that cannot complete inline and runs on an io-wq worker thread (fsync,
    /// fallocate): counted in `worker_ops_in_flight` until its completion is reaped.
    ///
    /// # Safety
    /// As for `push`.
    pub unsafe fn push_worker_op(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: the caller guarantees what `push` requires.
        let pushed = unsafe { self.push(entry) };
        if pushed {
            self.worker_ops.push(entry.get_user_data());
        }
        pushed
    }

    /// Operations in flight on io-wq workers: while there are any, a reactor sharing its core with
    /// those workers must not spin (the worker would wait for the spin to end).
    pub fn worker_ops_in_flight(&self) -> usize {
        self.worker_ops.len()
    }

    /// Hands queued entries to the kernel: once per reactor iteration, so that a burst costs one syscall.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the kernel is short of completion space; entries stay queued for later.
                Err(error)
                    if matches!(error.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) =>
                {
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
        }
        self.unsubmitted = 0;
        Ok(())
    }

    /// Moves every posted completion into `out` as `(user_data, result)`; returns how many there were.
    /// (`out` is the reactor's preallocated list, so that completions can be handled while the ring is
    /// used again for follow-up submissions.)
    pub fn reap_into(&mut self, out: &mut Vec<(u64, i32)>) -> usize {
        let before = out.len();
        let mut completion = self.ring.completion();
        completion.sync();
        for entry in &mut completion {
            out.push((entry.user_data(), entry.result()));
        }
        drop(completion);
        if !self.worker_ops.is_empty() {
            for &(user_data, _) in &out[before..] {
                if let Some(index) = self.worker_ops.iter().position(|&op| op == user_data) {
                    self.worker_ops.swap_remove(index);
                }
            }
        }
        let reaped = out.len() - before;
        debug_assert!(reaped <= self.in_flight);
        self.in_flight -= reaped;
        reaped
    }

    /// Whether the completion queue holds entries (cheap check used before sleeping).
    pub fn has_completions(&mut self) -> bool {
        let mut completion = self.ring.completion();
        completion.sync();
        !completion.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};

    /// An fsync counts as a worker operation from its push until its completion is reaped; other
    /// operations reaped beside it do not disturb the count.
    #[test]
    fn worker_ops_are_counted_until_reaped() {
        let path = std::env::temp_dir().join(format!("ferroblock-uring-{}", std::process::id()));
        let file = std::fs::File::create(&path).expect("temp file");
        let mut uring = Uring::new().expect("io_uring");
        let fsync = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
            .build()
            .user_data(7);
        let nop = opcode::Nop::new().build().user_data(8);
        // SAFETY: neither entry references memory.
        assert!(unsafe { uring.push_worker_op(&fsync) });
        // SAFETY: as above.
        assert!(unsafe { uring.push(&nop) });
        assert_eq!(uring.worker_ops_in_flight(), 1);
        uring.submit().expect("submit");
        let mut reaped = Vec::new();
        while reaped.len() < 2 {
            uring.ring.submit_and_wait(1).expect("wait");
            uring.reap_into(&mut reaped);
        }
        reaped.sort_unstable();
        assert_eq!(reaped, vec![(7, 0), (8, 0)]);
        assert_eq!(uring.worker_ops_in_flight(), 0);
        assert_eq!(uring.in_flight(), 0);
        let _ = std::fs::remove_file(&path);
    }
}
