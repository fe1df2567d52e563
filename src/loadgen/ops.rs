//! Which operation a connection issues next: read or write, size, offset, and (under a rate limit) when.
//!
//! Owns: the per-connection random stream, the sequential cursor, the open-loop schedule and the stop
//! condition. Must never: do IO; it is shared by the NBD and io_uring engines so that both run exactly
//! the same workload.

use std::time::{Duration, Instant};

use super::workload::Workload;

/// After this many tries to find a block that overlaps no request in flight (under --verify), wait for
/// a completion instead.
const OVERLAP_RETRIES_MAX: usize = 16;

/// xorshift64*: enough randomness for offsets, sizes and the read/write mix.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One operation to issue.
#[derive(Debug, Clone, Copy)]
pub struct PlannedOp {
    pub is_write: bool,
    pub offset: u64,
    pub length: u32,
    /// When its latency starts: now, or when it was due under a rate limit (so queueing counts).
    pub started: Instant,
    /// The seed a `--verify` write stamps into its sectors.
    pub write_seed: u64,
    /// Issued after the `--ramp` (counted and recorded); ramp operations are neither.
    pub measured: bool,
}

pub struct OpPicker<'a> {
    workload: &'a Workload,
    index: usize,
    rng: Rng,
    region_start: u64,
    region_bytes: u64,
    sequential_cursor: u64,
    rate_interval: Option<Duration>,
    next_due: Instant,
    /// End of the `--ramp`: operations that start from here on are measured.
    measure_from: Instant,
    ops_quota: Option<u64>,
    stop_at: Option<Instant>,
    issued: u64,
    writes_issued: u64,
}

impl<'a> OpPicker<'a> {
    pub fn new(
        workload: &'a Workload,
        index: usize,
        (region_start, region_bytes): (u64, u64),
        start: Instant,
    ) -> OpPicker<'a> {
        let rng = Rng::new(
            workload
                .seed
                .wrapping_add((index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        let rate_interval = workload.rate_iops.map(|rate| {
            // Each connection takes its share of the total rate.
            Duration::from_nanos(
                (1_000_000_000u128 * workload.connections as u128 / u128::from(rate)) as u64,
            )
        });
        OpPicker {
            workload,
            index,
            rng,
            region_start,
            region_bytes,
            sequential_cursor: region_start,
            rate_interval,
            next_due: start,
            measure_from: start + workload.ramp,
            ops_quota: workload.ops_for_connection(index),
            stop_at: workload
                .duration
                .map(|duration| start + workload.ramp + duration),
            issued: 0,
            writes_issued: 0,
        }
    }

    /// A payload byte for writes without --verify (never zero).
    pub fn payload_byte(&mut self) -> u8 {
        self.rng.next_u64() as u8 | 1
    }

    /// True once the run is out of time or this connection out of operations.
    pub fn is_done(&self, now: Instant) -> bool {
        self.stop_at.is_some_and(|stop| now >= stop)
            || self.ops_quota.is_some_and(|quota| self.issued >= quota)
    }

    /// When the next operation is due under a rate limit.
    pub fn next_due(&self) -> Option<Instant> {
        self.rate_interval.map(|_| self.next_due)
    }

    /// The next operation, or `None` when it is not due yet, the run is done, or (under --verify) every
    /// candidate block overlaps one in flight (`overlaps(offset, length)`).
    pub fn pick(&mut self, now: Instant, overlaps: impl Fn(u64, u32) -> bool) -> Option<PlannedOp> {
        if self.is_done(now) {
            return None;
        }
        let started = match self.rate_interval {
            Some(_) if now < self.next_due => return None,
            Some(_) => self.next_due,
            None => now,
        };
        let length = self.workload.block_sizes.pick(self.rng.next_u64());
        let is_write = self.rng.next_u64() % 100 >= u64::from(self.workload.read_percent);
        let random = self.workload.read_write.is_random();
        let mut offset = None;
        for _ in 0..OVERLAP_RETRIES_MAX {
            let candidate = if random {
                let blocks = self.region_bytes / u64::from(length);
                self.region_start + (self.rng.next_u64() % blocks) * u64::from(length)
            } else {
                if self.sequential_cursor + u64::from(length)
                    > self.region_start + self.region_bytes
                {
                    self.sequential_cursor = self.region_start;
                }
                self.sequential_cursor
            };
            if !(self.workload.verify && overlaps(candidate, length)) {
                offset = Some(candidate);
                break;
            }
            if !random {
                break;
            }
        }
        let offset = offset?;
        if !random {
            self.sequential_cursor = offset + u64::from(length);
        }
        if let Some(interval) = self.rate_interval {
            self.next_due += interval;
        }
        let measured = started >= self.measure_from;
        if measured {
            // --ops counts measured operations only.
            self.issued += 1;
        }
        let write_seed = self.workload.seed ^ ((self.index as u64) << 48) ^ self.writes_issued;
        if is_write {
            self.writes_issued += 1;
        }
        Some(PlannedOp {
            is_write,
            offset,
            length,
            started,
            write_seed,
            measured,
        })
    }
}
