//! Results of a benchmark: the summary table or JSON object, the live progress line, and the
//! HdrHistogram interval log written by `--hist`.
//!
//! Owns: output formats. Must never: measure anything (it only formats what the connections measured).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::nbd::ConnectionTotals;
use super::workload::{PollMode, Workload};
use super::{BenchError, INTERVAL};

/// A last interval shorter than this is merged into the one before it in the `--hist` log.
const TAIL_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// Everything a run produced.
pub struct Summary {
    pub workload: Workload,
    pub totals: ConnectionTotals,
    /// Every operation's latency, in nanoseconds.
    pub histogram: Histogram<u64>,
    /// The measured run (after any `--ramp`).
    pub elapsed: Duration,
    /// This process's CPU time over the measured run (`None` if the run ended inside its ramp).
    pub cpu: Option<CpuUsage>,
}

/// User and system CPU time of the whole process over a stretch of wall time.
#[derive(Debug, Clone, Copy)]
pub struct CpuUsage {
    pub wall_seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
}

impl CpuUsage {
    fn percent(&self, seconds: f64) -> f64 {
        100.0 * seconds / self.wall_seconds.max(f64::MIN_POSITIVE)
    }
}

/// (user, system) CPU seconds of this process so far, all threads (getrusage).
pub fn process_cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage only writes the zeroed struct owned by this frame.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    (seconds(usage.ru_utime), seconds(usage.ru_stime))
}

/// The percentiles reported, with their JSON names and table headings.
const PERCENTILES: [(f64, &str, &str); 6] = [
    (50.0, "p50_us", "p50"),
    (90.0, "p90_us", "p90"),
    (99.0, "p99_us", "p99"),
    (99.9, "p999_us", "p99.9"),
    (99.99, "p9999_us", "p99.99"),
    (100.0, "max_us", "max"),
];

fn microseconds(nanoseconds: u64) -> f64 {
    nanoseconds as f64 / 1000.0
}

impl Summary {
    pub fn ops(&self) -> u64 {
        self.totals.reads + self.totals.writes
    }

    pub fn errors(&self) -> u64 {
        self.totals.errors_io + self.totals.errors_verify
    }

    pub fn seconds(&self) -> f64 {
        self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    pub fn iops(&self) -> f64 {
        self.ops() as f64 / self.seconds()
    }

    /// Decimal megabytes (10^6 bytes) per second.
    pub fn mbps(&self) -> f64 {
        self.totals.bytes as f64 / 1e6 / self.seconds()
    }

    fn percentile_us(&self, percentile: f64) -> f64 {
        if percentile >= 100.0 {
            microseconds(self.histogram.max())
        } else {
            microseconds(self.histogram.value_at_percentile(percentile))
        }
    }

    fn mean_us(&self) -> f64 {
        self.histogram.mean() / 1000.0
    }

    pub fn to_json(&self) -> String {
        let workload = &self.workload;
        let mut json = format!(
            concat!(
                "{{\"rw\":\"{}\",\"rwmixread\":{},\"bs\":\"{}\",\"qd\":{},\"conns\":{},",
                "\"poll\":\"{}\",\"verify\":{},\"rate_iops\":{},\"seconds\":{:.3},\"ops\":{},",
                "\"reads\":{},\"writes\":{},\"bytes\":{},\"errors\":{},\"errors_io\":{},",
                "\"errors_verify\":{},\"iops\":{:.1},\"mbps\":{:.3},\"min_us\":{:.3},\"mean_us\":{:.3}"
            ),
            workload.read_write.name(),
            workload.read_percent,
            workload.block_sizes.describe(),
            workload.queue_depth,
            workload.connections,
            poll_name(workload.poll),
            workload.verify,
            workload
                .rate_iops
                .map_or_else(|| "null".to_owned(), |rate| rate.to_string()),
            self.seconds(),
            self.ops(),
            self.totals.reads,
            self.totals.writes,
            self.totals.bytes,
            self.errors(),
            self.totals.errors_io,
            self.totals.errors_verify,
            self.iops(),
            self.mbps(),
            microseconds(self.histogram.min()),
            self.mean_us(),
        );
        for (percentile, name, _) in PERCENTILES {
            json.push_str(&format!(
                ",\"{name}\":{:.3}",
                self.percentile_us(percentile)
            ));
        }
        json.push_str(&format!(
            ",\"ramp_seconds\":{:.3}",
            workload.ramp.as_secs_f64()
        ));
        if let Some(cpu) = self.cpu {
            // Busy-polling connections are always near 100% CPU: work_percent is the share of it spent
            // in loop iterations that moved data, spin_idle_percent the share that found nothing (wall
            // time shares of the loop, scaled to the CPU time).
            let cpu_percent = cpu.percent(cpu.user_seconds + cpu.system_seconds);
            let looped = (self.totals.idle_nanos + self.totals.busy_nanos).max(1) as f64;
            json.push_str(&format!(
                concat!(
                    ",\"cpu_percent\":{:.1},\"user_percent\":{:.1},\"sys_percent\":{:.1},",
                    "\"spin_idle_percent\":{:.1},\"work_percent\":{:.1}"
                ),
                cpu_percent,
                cpu.percent(cpu.user_seconds),
                cpu.percent(cpu.system_seconds),
                cpu_percent * self.totals.idle_nanos as f64 / looped,
                cpu_percent * self.totals.busy_nanos as f64 / looped,
            ));
        }
        json.push('}');
        json
    }

    pub fn to_table(&self) -> String {
        let workload = &self.workload;
        let mut table = format!(
            "{} bs={} qd={} conns={} poll={}{}: {} ops in {:.3} s ({} reads, {} writes, {} errors)\n",
            workload.read_write.name(),
            workload.block_sizes.describe(),
            workload.queue_depth,
            workload.connections,
            poll_name(workload.poll),
            if workload.verify { " verify" } else { "" },
            self.ops(),
            self.seconds(),
            self.totals.reads,
            self.totals.writes,
            self.errors(),
        );
        table.push_str(&format!("{:>12} {:>10} {:>10}", "IOPS", "MB/s", "mean(us)"));
        for (_, _, heading) in PERCENTILES {
            table.push_str(&format!(" {:>10}", format!("{heading}(us)")));
        }
        table.push('\n');
        table.push_str(&format!(
            "{:>12.0} {:>10.1} {:>10.1}",
            self.iops(),
            self.mbps(),
            self.mean_us()
        ));
        for (percentile, _, _) in PERCENTILES {
            table.push_str(&format!(" {:>10.1}", self.percentile_us(percentile)));
        }
        table.push('\n');
        table
    }
}

fn poll_name(poll: PollMode) -> &'static str {
    match poll {
        PollMode::Busy => "busy",
        PollMode::Interrupt => "interrupt",
    }
}

/// A once-a-second progress line on stderr when stdout is a terminal; hidden otherwise.
pub fn progress_bar(on_terminal: bool) -> ProgressBar {
    if !on_terminal {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| {
            // The template is a constant; fall back to the default style rather than fail a run.
            ProgressStyle::default_spinner()
        }),
    );
    bar.set_message("starting");
    bar
}

/// Writes the interval histograms as an HdrHistogram interval log (values in nanoseconds; the log's
/// max column in microseconds).
pub fn write_interval_log(
    path: &Path,
    workload: &Workload,
    start_wall: SystemTime,
    elapsed: Duration,
    intervals: &BTreeMap<u64, Histogram<u64>>,
) -> Result<(), BenchError> {
    let failed = |error: String| BenchError::HistogramLog {
        path: path.to_owned(),
        error,
    };
    let file = File::create(path).map_err(|error| failed(error.to_string()))?;
    let mut writer = BufWriter::new(file);
    let mut serializer = V2DeflateSerializer::new();
    let mut log = IntervalLogWriterBuilder::new()
        .add_comment(&format!(
            "ferroblock bench {} bs={} qd={} conns={} (latency in ns)",
            workload.read_write.name(),
            workload.block_sizes.describe(),
            workload.queue_depth,
            workload.connections
        ))
        .with_start_time(start_wall)
        .with_base_time(start_wall)
        .with_max_value_divisor(1000.0)
        .begin_log_with(&mut writer, &mut serializer)
        .map_err(|error| failed(error.to_string()))?;
    let mut entries: Vec<(Duration, Duration, Histogram<u64>)> = intervals
        .iter()
        .map(|(&index, histogram)| {
            let interval_start = INTERVAL * index as u32;
            let duration = elapsed.saturating_sub(interval_start).min(INTERVAL);
            (interval_start, duration, histogram.clone())
        })
        .collect();
    // The drain after a timed run ends leaves a sliver of an interval; fold it into the one before, so
    // that IOPS over time does not end in a spurious spike or drop.
    if entries.len() >= 2
        && let Some((_, duration, _)) = entries.last()
        && *duration < TAIL_INTERVAL_MIN
        && let Some((_, tail_duration, tail)) = entries.pop()
        && let Some((_, previous_duration, previous)) = entries.last_mut()
    {
        previous
            .add(&tail)
            .map_err(|error| failed(format!("{error:?}")))?;
        *previous_duration += tail_duration;
    }
    for (interval_start, duration, histogram) in &entries {
        log.write_histogram(histogram, *interval_start, *duration, None)
            .map_err(|error| failed(format!("{error:?}")))?;
    }
    drop(log);
    writer.flush().map_err(|error| failed(error.to_string()))
}
