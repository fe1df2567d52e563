//! One benchmark "connection" to a local file or block device: its own descriptor (O_DIRECT when the
//! file system allows it) and its own io_uring, with up to `queue_depth` reads and writes in flight.
//!
//! Owns: the descriptor, the ring and one page-aligned buffer per slot. Must never: let a buffer move or
//! be reused while the kernel holds it (slots are never resized, and a slot is freed only when its
//! completion is reaped).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::nbd::{ConnectionTotals, ERROR_REPORTS_MAX};
use super::ops::OpPicker;
use super::verify;
use super::workload::{PollMode, Workload};
use super::{BenchError, IntervalHistogram, IntervalRecorder, Progress, RunClock};
use crate::io::AlignedBuf;
use crate::io::uring::Uring;

/// Waiting for a completion gives up (and the run fails) after this long.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// An opened target file.
pub struct FileTarget {
    file: File,
    pub size_bytes: u64,
    /// Whether O_DIRECT was accepted (false on file systems such as tmpfs).
    pub direct: bool,
}

/// Opens `path` for the workload (read-only when it only reads), with O_DIRECT if possible.
pub fn open(path: &Path, writes: bool) -> Result<FileTarget, BenchError> {
    let failed = |error: io::Error| BenchError::Open {
        path: path.to_owned(),
        error,
    };
    let options = |direct: bool| {
        let mut options = OpenOptions::new();
        options.read(true).write(writes);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        options
    };
    let (mut file, direct) = match options(true).open(path) {
        Ok(file) => (file, true),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            (options(false).open(path).map_err(failed)?, false)
        }
        Err(error) => return Err(failed(error)),
    };
    if !direct {
        eprintln!(
            "ferroblock bench: {} does not take O_DIRECT; going through the page cache",
            path.display()
        );
    }
    // Seeking to the end gives the size of regular files and block devices alike.
    let size_bytes = file.seek(SeekFrom::End(0)).map_err(failed)?;
    Ok(FileTarget {
        file,
        size_bytes,
        direct,
    })
}

struct Slot {
    busy: bool,
    is_write: bool,
    offset: u64,
    length: u32,
    started: Instant,
    measured: bool,
    buffer: AlignedBuf,
}

/// Runs the workload's share for "connection" `index` on an opened file.
pub fn run(
    target: FileTarget,
    path: &Path,
    workload: &Workload,
    index: usize,
    clock: &RunClock,
    progress: &Progress,
    intervals: &Sender<IntervalHistogram>,
) -> Result<ConnectionTotals, BenchError> {
    let region = workload
        .region(index, target.size_bytes)
        .map_err(BenchError::Workload)?;
    let fd = types::Fd(target.file.as_raw_fd());
    let block_size_max = workload.block_sizes.size_max_bytes() as usize;
    let mut ring = Uring::new().map_err(|error| BenchError::Open {
        path: path.to_owned(),
        error,
    })?;
    let mut slots: Vec<Slot> = (0..workload.queue_depth)
        .map(|_| Slot {
            busy: false,
            is_write: false,
            offset: 0,
            length: 0,
            started: Instant::now(),
            measured: false,
            buffer: AlignedBuf::with_capacity(block_size_max),
        })
        .collect();
    let mut free: Vec<usize> = (0..workload.queue_depth).rev().collect();
    let mut completions: Vec<(u64, i32)> = Vec::with_capacity(2 * workload.queue_depth);

    let Some(start) = clock.wait_for_start() else {
        return Ok(ConnectionTotals::default());
    };
    let mut picker = OpPicker::new(workload, index, region, start);
    let mut recorder = IntervalRecorder::new(intervals)?;
    let mut totals = ConnectionTotals::default();
    let mut last_progress = start;
    let measure_from = start + workload.ramp;
    // Whether the previous loop iteration reaped anything, and when it began (for idle/busy time).
    let mut reaped = true;
    let mut iteration_began = start;

    loop {
        let now = Instant::now();
        if iteration_began >= measure_from {
            let nanos = now.duration_since(iteration_began).as_nanos() as u64;
            if reaped {
                totals.busy_nanos += nanos;
            } else {
                totals.idle_nanos += nanos;
            }
        }
        iteration_began = now;
        reaped = false;
        let stopping = picker.is_done(now);
        while !free.is_empty() && ring.has_room() {
            let overlaps = |offset: u64, length: u32| {
                slots.iter().any(|slot| {
                    slot.busy
                        && offset < slot.offset + u64::from(slot.length)
                        && slot.offset < offset + u64::from(length)
                })
            };
            let Some(op) = picker.pick(now, overlaps) else {
                break;
            };
            let Some(slot_index) = free.pop() else {
                break;
            };
            let slot = &mut slots[slot_index];
            slot.buffer.set_len(op.length as usize);
            if op.is_write {
                if workload.verify {
                    verify::stamp(slot.buffer.as_mut_slice(), op.offset, op.write_seed);
                } else {
                    let seed = op.write_seed;
                    for (position, byte) in slot.buffer.as_mut_slice().iter_mut().enumerate() {
                        *byte = (seed as u8 ^ position as u8) | 1;
                    }
                }
            }
            let pointer = slot.buffer.as_mut_ptr();
            let entry = if op.is_write {
                opcode::Write::new(fd, pointer, op.length)
                    .offset(op.offset)
                    .build()
            } else {
                opcode::Read::new(fd, pointer, op.length)
                    .offset(op.offset)
                    .build()
            }
            .user_data(slot_index as u64);
            // SAFETY: the buffer belongs to `slots[slot_index]`, which is marked busy below and is neither
            // reused nor dropped until this entry's completion is reaped (the loop only ends with nothing
            // in flight); `slots` is never resized, so the buffer does not move.
            let pushed = unsafe { ring.push(&entry) };
            if !pushed {
                // `has_room` was checked: only a failed submission of a full queue ends here.
                return Err(BenchError::Io(io::Error::other(
                    "io_uring refused an entry although it had room",
                )));
            }
            slot.busy = true;
            slot.is_write = op.is_write;
            slot.offset = op.offset;
            slot.length = op.length;
            slot.started = op.started;
            slot.measured = op.measured;
        }
        ring.submit().map_err(BenchError::Io)?;

        if ring.in_flight() == 0 {
            if stopping {
                break;
            }
            if let Some(due) = picker.next_due() {
                let wait = due.saturating_duration_since(Instant::now());
                if workload.poll == PollMode::Interrupt && !wait.is_zero() {
                    std::thread::sleep(wait.min(STALL_LIMIT));
                }
            }
            last_progress = Instant::now();
            continue;
        }
        completions.clear();
        if ring.reap_into(&mut completions) == 0 {
            if now.duration_since(last_progress) > STALL_LIMIT {
                return Err(BenchError::Protocol(format!(
                    "no completion for {STALL_LIMIT:?} with {} operations in flight",
                    ring.in_flight()
                )));
            }
            if workload.poll == PollMode::Interrupt {
                wait_for_completion(&ring, picker.next_due())?;
            }
            continue;
        }
        last_progress = now;
        reaped = true;
        let done_at = Instant::now();
        let mut completed_bytes = 0u64;
        for &(user_data, result) in &completions {
            let slot_index = user_data as usize;
            let slot = &mut slots[slot_index];
            debug_assert!(slot.busy, "completion for an idle slot {slot_index}");
            slot.busy = false;
            free.push(slot_index);
            if result != slot.length as i32 {
                totals.errors_io += 1;
                if totals.errors_io <= ERROR_REPORTS_MAX {
                    let what = if result < 0 {
                        io::Error::from_raw_os_error(-result).to_string()
                    } else {
                        format!("short transfer of {result} bytes")
                    };
                    eprintln!(
                        "ferroblock bench: {} of {} bytes at offset {} failed: {what}",
                        if slot.is_write { "write" } else { "read" },
                        slot.length,
                        slot.offset
                    );
                }
            } else if workload.verify
                && !slot.is_write
                && let Err(failure) = verify::check(slot.buffer.as_slice(), slot.offset)
            {
                totals.errors_verify += 1;
                if totals.errors_verify <= ERROR_REPORTS_MAX {
                    eprintln!(
                        "ferroblock bench: {failure} (in a {}-byte read at offset {})",
                        slot.length, slot.offset
                    );
                }
            }
            completed_bytes += u64::from(slot.length);
            if !slot.measured {
                continue;
            }
            if slot.is_write {
                totals.writes += 1;
            } else {
                totals.reads += 1;
            }
            totals.bytes += u64::from(slot.length);
            recorder.record(clock, slot.started, done_at);
        }
        progress
            .ops
            .fetch_add(completions.len() as u64, Ordering::Relaxed);
        progress.bytes.fetch_add(completed_bytes, Ordering::Relaxed);
    }
    recorder.finish();
    Ok(totals)
}

/// Interrupt mode: blocks on the ring's eventfd until a completion is posted (or the next rate-limited
/// operation is due).
fn wait_for_completion(ring: &Uring, next_due: Option<Instant>) -> Result<(), BenchError> {
    let mut timeout = STALL_LIMIT;
    if let Some(due) = next_due {
        timeout = timeout.min(due.saturating_duration_since(Instant::now()));
    }
    let mut pollfd = libc::pollfd {
        fd: ring.eventfd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timespec = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one valid pollfd and one timespec, both owned by this frame; no signal mask is passed.
    let result = unsafe { libc::ppoll(&mut pollfd, 1, &timespec, std::ptr::null()) };
    if result < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(BenchError::Io(error));
        }
    }
    ring.drain_eventfd();
    Ok(())
}
