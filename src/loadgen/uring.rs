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
use super::slots::{InFlight, LoopTime, wait_ready, wait_until_due};
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
    request: InFlight,
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
            request: InFlight::idle(Instant::now()),
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
    // An iteration works when it reaps completions.
    let mut time = LoopTime::new(start, measure_from);

    loop {
        let now = Instant::now();
        time.next_iteration(now, &mut totals);
        let stopping = picker.is_done(now);
        while !free.is_empty() && ring.has_room() {
            let overlaps = |offset: u64, length: u32| {
                slots
                    .iter()
                    .any(|slot| slot.request.overlaps(offset, length))
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
            slot.request = InFlight::issued(&op);
        }
        ring.submit().map_err(BenchError::Io)?;

        if ring.in_flight() == 0 {
            if stopping {
                break;
            }
            wait_until_due(&picker, workload.poll, STALL_LIMIT);
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
        time.worked();
        let done_at = Instant::now();
        let mut completed_bytes = 0u64;
        for &(user_data, result) in &completions {
            let slot_index = user_data as usize;
            let slot = &mut slots[slot_index];
            let request = slot.request;
            debug_assert!(request.busy, "completion for an idle slot {slot_index}");
            slot.request.busy = false;
            free.push(slot_index);
            if result != request.length as i32 {
                totals.errors_io += 1;
                if totals.errors_io <= ERROR_REPORTS_MAX {
                    let what = if result < 0 {
                        io::Error::from_raw_os_error(-result).to_string()
                    } else {
                        format!("short transfer of {result} bytes")
                    };
                    eprintln!(
                        "ferroblock bench: {} of {} bytes at offset {} failed: {what}",
                        if request.is_write { "write" } else { "read" },
                        request.length,
                        request.offset
                    );
                }
            } else if workload.verify
                && !request.is_write
                && let Err(failure) = verify::check(slot.buffer.as_slice(), request.offset)
            {
                totals.verify_failed(&failure, &request);
            }
            completed_bytes += u64::from(request.length);
            request.count_finished(&mut totals, &mut recorder, clock, done_at);
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
    wait_ready(ring.eventfd(), libc::POLLIN, timeout).map_err(BenchError::Io)?;
    ring.drain_eventfd();
    Ok(())
}
