//! What both benchmark loops (NBD over a socket, io_uring on a file) keep per queue slot and per loop
//! iteration: the request a slot has in flight and its overlap test, the split of the loop's measured
//! time into busy and idle iterations, and the counting of a finished request.
//!
//! Owns no IO and no buffer: each loop keeps its own (the NBD loop its send queue, the file loop one
//! aligned buffer per slot).

use std::io;
use std::time::{Duration, Instant};

use super::nbd::ConnectionTotals;
use super::ops::{OpPicker, PlannedOp};
use super::workload::PollMode;
use super::{IntervalRecorder, RunClock};

/// Nothing in flight and more to come: under a rate limit, an interrupt-mode loop sleeps until the
/// next request is due (at most `limit`); a polling loop just goes round again.
pub fn wait_until_due(picker: &OpPicker, poll: PollMode, limit: Duration) {
    if let Some(due) = picker.next_due() {
        let wait = due.saturating_duration_since(Instant::now());
        if poll == PollMode::Interrupt && !wait.is_zero() {
            std::thread::sleep(wait.min(limit));
        }
    }
}

/// The request a queue slot has in flight (`busy`), or had last.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    pub busy: bool,
    pub is_write: bool,
    pub offset: u64,
    pub length: u32,
    pub started: Instant,
    /// Started after the ramp: counted in the results.
    pub measured: bool,
}

impl InFlight {
    pub fn idle(now: Instant) -> InFlight {
        InFlight {
            busy: false,
            is_write: false,
            offset: 0,
            length: 0,
            started: now,
            measured: false,
        }
    }

    /// The slot's record of `op`, just issued.
    pub fn issued(op: &PlannedOp) -> InFlight {
        InFlight {
            busy: true,
            is_write: op.is_write,
            offset: op.offset,
            length: op.length,
            started: op.started,
            measured: op.measured,
        }
    }

    /// Whether this slot has a request in flight over any of `offset .. offset + length`.
    pub fn overlaps(&self, offset: u64, length: u32) -> bool {
        self.busy
            && offset < self.offset + u64::from(self.length)
            && self.offset < offset + u64::from(length)
    }

    /// Counts the finished request in `totals` and its latency in `recorder` (measured ones only).
    pub fn count_finished(
        &self,
        totals: &mut ConnectionTotals,
        recorder: &mut IntervalRecorder,
        clock: &RunClock,
        done_at: Instant,
    ) {
        if !self.measured {
            return;
        }
        if self.is_write {
            totals.writes += 1;
        } else {
            totals.reads += 1;
        }
        totals.bytes += u64::from(self.length);
        recorder.record(clock, self.started, done_at);
    }
}

/// Splits a polling loop's measured wall time into iterations that did work and idle ones: the
/// share of a busy-polling client's CPU that went to work rather than spinning.
pub struct LoopTime {
    began: Instant,
    worked: bool,
    measure_from: Instant,
}

impl LoopTime {
    pub fn new(start: Instant, measure_from: Instant) -> LoopTime {
        LoopTime {
            began: start,
            worked: true,
            measure_from,
        }
    }

    /// Starts an iteration at `now`; the one before goes to busy or idle time (after the ramp).
    pub fn next_iteration(&mut self, now: Instant, totals: &mut ConnectionTotals) {
        if self.began >= self.measure_from {
            let nanos = now.duration_since(self.began).as_nanos() as u64;
            if self.worked {
                totals.busy_nanos += nanos;
            } else {
                totals.idle_nanos += nanos;
            }
        }
        self.began = now;
        self.worked = false;
    }

    /// This iteration did work (moved bytes, reaped completions).
    pub fn worked(&mut self) {
        self.worked = true;
    }

    pub fn has_worked(&self) -> bool {
        self.worked
    }
}

/// Blocks until `fd` is ready for `events` or `timeout` passes (interrupt mode only). An
/// interrupted wait returns early: the caller loops.
pub fn wait_ready(fd: i32, events: i16, timeout: Duration) -> io::Result<()> {
    let mut pollfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one valid pollfd and one timespec, both owned by this frame; no signal mask is passed.
    let result = unsafe { libc::ppoll(&mut pollfd, 1, &timeout, std::ptr::null()) };
    if result < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(())
}
