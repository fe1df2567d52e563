//! `ferroblock bench`: a latency load generator for any NBD server.
//!
//! Each connection runs on its own thread (`nbd`), keeps `--qd` requests in flight in its own slice of
//! the range, and records every latency (ns) into a per-second histogram that it sends here; this
//! module merges them, shows a progress line on a terminal, writes the `--hist` interval log and the
//! summary (`report`).
//!
//! Owns: the `bench` flags and the run's lifecycle. Must never: touch the server's internals (it only
//! speaks NBD), or run with an unchecked workload (exit code 2 before any connection is made).

pub mod nbd;
pub mod ops;
pub mod report;
pub mod slots;
pub mod uring;
pub mod verify;
pub mod workload;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use hdrhistogram::Histogram;

use self::nbd::ConnectionTotals;
use self::report::Summary;
use self::workload::{PollMode, ReadWrite, Target, Workload, WorkloadError};

/// Length of one interval of the `--hist` log (and of the progress line's refresh).
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Latencies are recorded in nanoseconds up to this bound (longer ones saturate).
pub const LATENCY_NS_MAX: u64 = 120_000_000_000;
/// Significant decimal digits kept by the histograms.
pub const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;
/// How often the main thread looks at the connections while they run.
const SUPERVISE_TICK: Duration = Duration::from_millis(100);
/// Seed used when `--seed` is not given: runs are reproducible by default.
const SEED_DEFAULT: u64 = 0x5eed_f0e5_b10c;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Target: nbd://HOST:PORT/EXPORT (any NBD server), or a local file or block device (/path, ./path,
    /// file://path) driven through io_uring, with O_DIRECT where the file system allows it.
    pub uri: String,

    /// Access pattern.
    #[arg(long, value_enum, default_value_t = ReadWrite::Randread)]
    pub rw: ReadWrite,

    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50)]
    pub rwmixread: u32,

    /// Block size (4k, 64k, 1M; a multiple of 512), or a mix with percentage weights: 4k:60,64k:40.
    #[arg(long, default_value = "4k")]
    pub bs: String,

    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub qd: usize,

    /// Connections, each on its own thread with its own slice of the range.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,

    /// Open-loop rate limit in operations per second, all connections together (5000, 20k, 1m).
    /// Latency is then measured from when each request was due, so queueing counts.
    #[arg(long)]
    pub rate: Option<String>,

    /// Run time (10s, 500ms, 2m). With --ops too, the run stops at whichever comes first.
    #[arg(long)]
    pub time: Option<String>,

    /// Total operations over all connections.
    #[arg(long)]
    pub ops: Option<u64>,

    /// Warm-up before the measured run (2s, 500ms): operations run but are neither counted nor
    /// recorded; --time and --ops then apply to the measured part.
    #[arg(long, default_value = "0")]
    pub ramp: String,

    /// Stamp every written 512-byte sector with its offset, the write's seed and a CRC-32C; check every
    /// sector read. A mismatch is reported and makes the exit code 1.
    #[arg(long)]
    pub verify: bool,

    /// busy: spin on non-blocking sockets; interrupt: block in poll(2) when idle.
    #[arg(long, value_enum, default_value_t = PollMode::Busy)]
    pub poll: PollMode,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Write the latency histograms (ns, one per second) to FILE in HdrHistogram interval log format.
    #[arg(long, value_name = "FILE")]
    pub hist: Option<PathBuf>,

    /// Bytes of the export to use, from offset 0 (64M, 1G) [default: the whole export].
    #[arg(long)]
    pub size: Option<String>,

    /// Seed for offsets, sizes and the read/write mix.
    #[arg(long, default_value_t = SEED_DEFAULT)]
    pub seed: u64,
}

impl BenchArgs {
    /// Checks every flag and builds the workload.
    pub fn into_workload(self) -> Result<(Workload, Output), WorkloadError> {
        let target = workload::parse_target(&self.uri)?;
        let rwmixread = workload::parse_read_percent(self.rwmixread)?;
        let block_sizes = workload::parse_block_size_mix(&self.bs)?;
        let rate_iops = self.rate.as_deref().map(workload::parse_rate).transpose()?;
        let duration = self
            .time
            .as_deref()
            .map(workload::parse_duration)
            .transpose()?;
        let range_bytes = self
            .size
            .as_deref()
            .map(workload::parse_range)
            .transpose()?;
        let ramp = workload::parse_ramp(&self.ramp)?;
        workload::check_counts(self.qd, self.conns, self.ops, duration)?;
        let workload = Workload {
            target,
            read_write: self.rw,
            read_percent: self.rw.read_percent(rwmixread),
            block_sizes,
            queue_depth: self.qd,
            connections: self.conns,
            rate_iops,
            duration,
            ramp,
            ops_total: self.ops,
            verify: self.verify,
            poll: self.poll,
            range_bytes,
            seed: self.seed,
        };
        let output = Output {
            json: self.json,
            hist: self.hist,
        };
        Ok((workload, output))
    }
}

/// Where the results go.
#[derive(Debug, Clone)]
pub struct Output {
    pub json: bool,
    pub hist: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("connecting to {address}: {error}")]
    Connect {
        address: String,
        error: std::io::Error,
    },
    #[error("opening {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("NBD protocol: {0}")]
    Protocol(String),
    #[error("socket: {0}")]
    Io(std::io::Error),
    #[error("histogram: {0}")]
    Histogram(String),
    #[error("writing {path}: {error}")]
    HistogramLog { path: PathBuf, error: String },
    #[error("a connection thread panicked")]
    Panicked,
}

impl BenchError {
    /// Exit code: 2 for a workload that cannot run, 1 for anything that went wrong while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Workload(_) => 2,
            _ => 1,
        }
    }
}

pub fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, HISTOGRAM_SIGNIFICANT_DIGITS)
        .map_err(|error| BenchError::Histogram(error.to_string()))
}

/// One connection's latencies for one interval.
pub struct IntervalHistogram {
    /// Interval number, counted from the start of the run.
    pub index: u64,
    pub histogram: Histogram<u64>,
}

/// One connection's latencies for the current one-second interval; each finished interval goes to the
/// report thread (for `--hist`). Shared by the NBD and the io_uring targets.
pub struct IntervalRecorder<'a> {
    intervals: &'a mpsc::Sender<IntervalHistogram>,
    histogram: Histogram<u64>,
    index: u64,
}

impl<'a> IntervalRecorder<'a> {
    pub fn new(
        intervals: &'a mpsc::Sender<IntervalHistogram>,
    ) -> Result<IntervalRecorder<'a>, BenchError> {
        Ok(IntervalRecorder {
            intervals,
            histogram: new_histogram()?,
            index: 0,
        })
    }

    /// Records an op that started at `started` and completed at `done_at`.
    pub fn record(&mut self, clock: &RunClock, started: Instant, done_at: Instant) {
        let index_now = clock.interval_index(done_at);
        if index_now != self.index {
            self.send();
            self.histogram.reset();
            self.index = index_now;
        }
        let latency_ns = done_at.saturating_duration_since(started).as_nanos();
        self.histogram.saturating_record((latency_ns as u64).max(1));
    }

    /// Sends the last, partial interval.
    pub fn finish(self) {
        self.send();
    }

    fn send(&self) {
        if !self.histogram.is_empty() {
            let _ = self.intervals.send(IntervalHistogram {
                index: self.index,
                histogram: self.histogram.clone(),
            });
        }
    }
}

/// Completed operations and bytes over all connections, for the progress line.
#[derive(Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
}

/// The start of the run, published once every connection has negotiated (`None`: the run is called
/// off because a connection failed).
#[derive(Default)]
pub struct RunClock {
    start: OnceLock<Option<Instant>>,
    /// The `--ramp`: the measured run (and interval 0) begins this long after the start.
    ramp: Duration,
}

impl RunClock {
    /// Waits for the start (or the call-off). Control plane: runs once per connection.
    pub fn wait_for_start(&self) -> Option<Instant> {
        loop {
            if let Some(start) = self.start.get() {
                return *start;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn interval_index(&self, at: Instant) -> u64 {
        match self.start.get() {
            Some(Some(start)) => {
                (at.saturating_duration_since(*start + self.ramp).as_nanos() / INTERVAL.as_nanos())
                    as u64
            }
            _ => 0,
        }
    }
}

/// Runs `ferroblock bench`; prints the result; returns the exit code.
pub fn run(args: BenchArgs) -> ExitCode {
    let (workload, output) = match args.into_workload() {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("ferroblock bench: {error}");
            return ExitCode::from(2);
        }
    };
    match run_workload(&workload, &output) {
        Ok(summary) => {
            let failed = summary.errors() > 0;
            if output.json {
                println!("{}", summary.to_json());
            } else {
                print!("{}", summary.to_table());
            }
            if failed {
                eprintln!(
                    "ferroblock bench: {} errors ({} IO errors, {} reads failed --verify)",
                    summary.errors(),
                    summary.totals.errors_io,
                    summary.totals.errors_verify
                );
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("ferroblock bench: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Connects, runs and collects: the whole benchmark.
pub fn run_workload(workload: &Workload, output: &Output) -> Result<Summary, BenchError> {
    let workload = Arc::new(workload.clone());
    let clock = Arc::new(RunClock {
        ramp: workload.ramp,
        ..RunClock::default()
    });
    let progress = Arc::new(Progress::default());
    let ready = Arc::new(AtomicU64::new(0));
    let (sender, receiver) = mpsc::channel::<IntervalHistogram>();
    let mut handles = Vec::with_capacity(workload.connections);
    for index in 0..workload.connections {
        let (workload, clock, progress, ready, sender) = (
            workload.clone(),
            clock.clone(),
            progress.clone(),
            ready.clone(),
            sender.clone(),
        );
        let handle = thread::Builder::new()
            .name(format!("bench-{index}"))
            .spawn(move || {
                // An error returns before `ready` counts this thread: main sees it finished and calls
                // the run off. The range is checked before anyone starts, so a bad --size fails before
                // any IO.
                match &workload.target {
                    Target::Nbd { address, export } => {
                        let connection = nbd::connect(address, export)?;
                        workload.region(index, connection.export_bytes)?;
                        ready.fetch_add(1, Ordering::SeqCst);
                        nbd::run(connection, &workload, index, &clock, &progress, &sender)
                    }
                    Target::File { path } => {
                        let target = uring::open(path, workload.read_percent < 100)?;
                        workload.region(index, target.size_bytes)?;
                        ready.fetch_add(1, Ordering::SeqCst);
                        uring::run(target, path, &workload, index, &clock, &progress, &sender)
                    }
                }
            })
            .map_err(BenchError::Io)?;
        handles.push(handle);
    }
    drop(sender);

    // Start once every connection has negotiated; call the run off if one fails first.
    while ready.load(Ordering::SeqCst) < workload.connections as u64 {
        if handles.iter().any(|handle| handle.is_finished()) {
            let _ = clock.start.set(None);
            let mut first_error = None;
            for handle in handles {
                let result = handle.join().map_err(|_| BenchError::Panicked);
                if let Err(error) | Ok(Err(error)) = result {
                    first_error.get_or_insert(error);
                }
            }
            return Err(first_error.unwrap_or(BenchError::Panicked));
        }
        thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    let measure_start = start + workload.ramp;
    let start_wall = SystemTime::now() + workload.ramp;
    let _ = clock.start.set(Some(start));
    // This process's CPU time over the measured run (all threads), for cpu_percent in the report.
    let mut cpu_at_measure_start = if workload.ramp.is_zero() {
        Some((measure_start, report::process_cpu_seconds()))
    } else {
        None
    };

    let progress_bar = report::progress_bar(std::io::stdout().is_terminal());
    let mut intervals: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    let mut last_shown = start;
    let mut ops_last_shown = 0u64;
    loop {
        let tick = match cpu_at_measure_start {
            None => SUPERVISE_TICK.min(measure_start.saturating_duration_since(Instant::now())),
            Some(_) => SUPERVISE_TICK,
        };
        match receiver.recv_timeout(tick) {
            Ok(interval) => match intervals.entry(interval.index) {
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(interval.histogram);
                }
                std::collections::btree_map::Entry::Occupied(mut entry) => {
                    entry
                        .get_mut()
                        .add(&interval.histogram)
                        .map_err(|error| BenchError::Histogram(format!("{error:?}")))?;
                }
            },
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if cpu_at_measure_start.is_none() && now >= measure_start {
            cpu_at_measure_start = Some((now, report::process_cpu_seconds()));
        }
        if now.duration_since(last_shown) >= INTERVAL {
            let ops = progress.ops.load(Ordering::Relaxed);
            let bytes = progress.bytes.load(Ordering::Relaxed);
            let seconds = now.duration_since(last_shown).as_secs_f64();
            progress_bar.set_message(format!(
                "{:>6.0}s  {:>10.0} IOPS  {:>9.1} MB/s total  {ops} ops  {bytes} bytes",
                now.duration_since(start).as_secs_f64(),
                (ops - ops_last_shown) as f64 / seconds,
                bytes as f64 / 1e6 / now.duration_since(start).as_secs_f64()
            ));
            ops_last_shown = ops;
            last_shown = now;
        }
    }
    let elapsed = measure_start.elapsed();
    let cpu = cpu_at_measure_start.map(|(at, (user_start, system_start))| {
        let (user_end, system_end) = report::process_cpu_seconds();
        report::CpuUsage {
            wall_seconds: at.elapsed().as_secs_f64(),
            user_seconds: user_end - user_start,
            system_seconds: system_end - system_start,
        }
    });
    progress_bar.finish_and_clear();

    let mut totals = ConnectionTotals::default();
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(connection)) => {
                totals.reads += connection.reads;
                totals.writes += connection.writes;
                totals.bytes += connection.bytes;
                totals.errors_io += connection.errors_io;
                totals.errors_verify += connection.errors_verify;
                totals.idle_nanos += connection.idle_nanos;
                totals.busy_nanos += connection.busy_nanos;
            }
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert(BenchError::Panicked);
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let mut histogram = new_histogram()?;
    for interval in intervals.values() {
        histogram
            .add(interval)
            .map_err(|error| BenchError::Histogram(format!("{error:?}")))?;
    }
    if let Some(path) = &output.hist {
        report::write_interval_log(path, &workload, start_wall, elapsed, &intervals)?;
    }
    Ok(Summary {
        workload: (*workload).clone(),
        totals,
        histogram,
        elapsed,
        cpu,
    })
}
