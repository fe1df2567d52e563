//! Workload description: the `bench` flags parsed and checked into a `Workload` before anything starts.
//!
//! Owns: every limit on a benchmark workload and the parsing of sizes, block-size mixes, rates and
//! durations. Must never: open sockets or start threads; a bad value is a `WorkloadError` naming the flag
//! (the process exits with code 2).

use std::time::Duration;

use crate::config::parse_size;
use crate::frontend::nbd::proto::{BLOCK_SIZE_MIN, REQUEST_LENGTH_MAX};

/// Every block size, offset and range is a multiple of this.
pub const SECTOR_SIZE_BYTES: u32 = BLOCK_SIZE_MIN;
/// Largest block size: the largest request an NBD server is asked to accept (ours refuses more).
pub const BLOCK_SIZE_MAX_BYTES: u32 = REQUEST_LENGTH_MAX;
/// Largest number of entries in a `--bs` mix.
pub const BLOCK_SIZE_MIX_ENTRIES_MAX: usize = 16;
/// Weights in a `--bs` mix are percentages and must add up to this.
pub const BLOCK_SIZE_MIX_WEIGHT_TOTAL: u32 = 100;
/// Requests in flight per connection.
pub const QUEUE_DEPTH_MAX: usize = 1024;
/// Connections (one thread each).
pub const CONNECTIONS_MAX: usize = 256;
/// Highest total rate limit, in operations per second.
pub const RATE_IOPS_MAX: u64 = 100_000_000;
/// Longest run.
pub const DURATION_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("--bs {text:?}: {reason}")]
    BlockSize { text: String, reason: String },
    #[error("--rwmixread {0}: must be a percentage from 0 to 100")]
    ReadPercent(u32),
    #[error("--rate {text:?}: {reason}")]
    Rate { text: String, reason: String },
    #[error("--time {text:?}: {reason}")]
    Duration { text: String, reason: String },
    #[error("--ramp {text:?}: {reason}")]
    Ramp { text: String, reason: String },
    #[error("--qd {0}: must be from 1 to {QUEUE_DEPTH_MAX}")]
    QueueDepth(usize),
    #[error("--conns {0}: must be from 1 to {CONNECTIONS_MAX}")]
    Connections(usize),
    #[error("--ops 0: must be at least 1")]
    ZeroOps,
    #[error("give --time DURATION or --ops N (or both: the run stops at whichever comes first)")]
    NoStopCondition,
    #[error("--size {text:?}: {reason}")]
    Range { text: String, reason: String },
    #[error("{uri:?} is not a target: {reason}")]
    Target { uri: String, reason: String },
    #[error(
        "range of {range_bytes} bytes split over {connections} connections leaves less than one \
         {block_size_max_bytes}-byte block per connection"
    )]
    RangeTooSmall {
        range_bytes: u64,
        connections: usize,
        block_size_max_bytes: u32,
    },
    #[error("--size {range_bytes} is larger than the export ({export_bytes} bytes)")]
    RangeBeyondExport { range_bytes: u64, export_bytes: u64 },
    #[error("the export is read-only, but the workload writes")]
    ReadOnlyExport,
}

/// The `--rw` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadWrite {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, mixed by --rwmixread.
    Randrw,
}

impl ReadWrite {
    pub fn name(self) -> &'static str {
        match self {
            ReadWrite::Read => "read",
            ReadWrite::Write => "write",
            ReadWrite::Randread => "randread",
            ReadWrite::Randwrite => "randwrite",
            ReadWrite::Randrw => "randrw",
        }
    }

    pub fn is_random(self) -> bool {
        matches!(
            self,
            ReadWrite::Randread | ReadWrite::Randwrite | ReadWrite::Randrw
        )
    }

    /// Percentage of operations that read.
    pub fn read_percent(self, rwmixread: u8) -> u8 {
        match self {
            ReadWrite::Read | ReadWrite::Randread => 100,
            ReadWrite::Write | ReadWrite::Randwrite => 0,
            ReadWrite::Randrw => rwmixread,
        }
    }
}

/// How a connection waits for its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    /// Spin on the non-blocking socket; never sleep.
    Busy,
    /// Block in poll(2) whenever there is nothing to do.
    Interrupt,
}

/// A weighted mix of block sizes; weights are percentages adding up to 100.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSizeMix {
    /// (size in bytes, weight in percent), sizes distinct.
    entries: Vec<(u32, u32)>,
}

impl BlockSizeMix {
    pub fn entries(&self) -> &[(u32, u32)] {
        &self.entries
    }

    pub fn size_max_bytes(&self) -> u32 {
        self.entries
            .iter()
            .map(|&(size, _)| size)
            .max()
            .unwrap_or(0)
    }

    /// The size for a uniformly random `draw` (any u64).
    pub fn pick(&self, draw: u64) -> u32 {
        let mut point = (draw % u64::from(BLOCK_SIZE_MIX_WEIGHT_TOTAL)) as u32;
        for &(size, weight) in &self.entries {
            if point < weight {
                return size;
            }
            point -= weight;
        }
        unreachable!("weights add up to {BLOCK_SIZE_MIX_WEIGHT_TOTAL}")
    }

    /// Text form, as given to `--bs`.
    pub fn describe(&self) -> String {
        if let [(size, _)] = self.entries.as_slice() {
            return size.to_string();
        }
        let parts: Vec<String> = self
            .entries
            .iter()
            .map(|(size, weight)| format!("{size}:{weight}"))
            .collect();
        parts.join(",")
    }
}

/// Parses `4k` or `4k:60,64k:40` (weights are percentages and must add up to 100).
pub fn parse_block_size_mix(text: &str) -> Result<BlockSizeMix, WorkloadError> {
    let bad = |reason: String| WorkloadError::BlockSize {
        text: text.to_owned(),
        reason,
    };
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if parts.len() > BLOCK_SIZE_MIX_ENTRIES_MAX {
        return Err(bad(format!(
            "at most {BLOCK_SIZE_MIX_ENTRIES_MAX} sizes in a mix"
        )));
    }
    let weighted = parts.iter().filter(|part| part.contains(':')).count();
    if parts.len() > 1 && weighted != parts.len() {
        return Err(bad(
            "a mix needs a weight on every size, like 4k:60,64k:40".into()
        ));
    }
    let mut entries = Vec::with_capacity(parts.len());
    for part in parts {
        let (size_text, weight) = match part.split_once(':') {
            Some((size_text, weight_text)) => {
                let weight: u32 = weight_text.trim().parse().map_err(|_| {
                    bad(format!("weight {weight_text:?} is not a whole percentage"))
                })?;
                if weight == 0 {
                    return Err(bad(format!("size {size_text:?} has weight 0")));
                }
                (size_text, weight)
            }
            None => (part, BLOCK_SIZE_MIX_WEIGHT_TOTAL),
        };
        let size = parse_size(size_text).map_err(bad)?;
        if size > u64::from(BLOCK_SIZE_MAX_BYTES) {
            return Err(bad(format!(
                "{size} bytes is larger than the maximum of {BLOCK_SIZE_MAX_BYTES}"
            )));
        }
        let size = size as u32;
        debug_assert!(size.is_multiple_of(SECTOR_SIZE_BYTES));
        if entries.iter().any(|&(seen, _)| seen == size) {
            return Err(bad(format!("size {size} is listed twice")));
        }
        entries.push((size, weight));
    }
    let total: u32 = entries.iter().map(|&(_, weight)| weight).sum();
    if total != BLOCK_SIZE_MIX_WEIGHT_TOTAL {
        return Err(bad(format!(
            "weights add up to {total}, not {BLOCK_SIZE_MIX_WEIGHT_TOTAL}"
        )));
    }
    Ok(BlockSizeMix { entries })
}

pub fn parse_read_percent(value: u32) -> Result<u8, WorkloadError> {
    u8::try_from(value)
        .ok()
        .filter(|&percent| percent <= 100)
        .ok_or(WorkloadError::ReadPercent(value))
}

/// Parses a total rate in operations per second: `5000`, `20k` or `1m` (decimal multipliers).
pub fn parse_rate(text: &str) -> Result<u64, WorkloadError> {
    let bad = |reason: &str| WorkloadError::Rate {
        text: text.to_owned(),
        reason: reason.to_owned(),
    };
    let lower = text.trim().to_ascii_lowercase();
    let (digits, multiplier) = match lower.strip_suffix('k') {
        Some(digits) => (digits, 1_000),
        None => match lower.strip_suffix('m') {
            Some(digits) => (digits, 1_000_000),
            None => (lower.as_str(), 1),
        },
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(bad("expected operations per second, like 5000 or 20k"));
    }
    let rate = digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .filter(|&rate| rate <= RATE_IOPS_MAX)
        .ok_or_else(|| bad("larger than the maximum of 100m"))?;
    if rate == 0 {
        return Err(bad("must be at least 1"));
    }
    Ok(rate)
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, WorkloadError> {
    let bad = |reason: &str| WorkloadError::Duration {
        text: text.to_owned(),
        reason: reason.to_owned(),
    };
    let lower = text.trim().to_ascii_lowercase();
    let (digits, unit_ms) = if let Some(digits) = lower.strip_suffix("ms") {
        (digits, 1)
    } else if let Some(digits) = lower.strip_suffix('s') {
        (digits, 1_000)
    } else if let Some(digits) = lower.strip_suffix('m') {
        (digits, 60_000)
    } else if let Some(digits) = lower.strip_suffix('h') {
        (digits, 3_600_000)
    } else {
        (lower.as_str(), 1_000)
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(bad("expected a duration like 10s, 500ms, 2m or 1h"));
    }
    let millis = digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(unit_ms))
        .map(Duration::from_millis)
        .filter(|&duration| duration <= DURATION_MAX)
        .ok_or_else(|| bad("longer than the maximum of one week"))?;
    if millis.is_zero() {
        return Err(bad("must be longer than zero"));
    }
    Ok(millis)
}

/// Where the load goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An NBD server: `HOST:PORT` and export name.
    Nbd { address: String, export: String },
    /// A local file or block device, through io_uring.
    File { path: std::path::PathBuf },
}

/// The NBD default port, used when the URI gives none.
pub const NBD_PORT_DEFAULT: u16 = 10809;

pub fn parse_target(uri: &str) -> Result<Target, WorkloadError> {
    let bad = |reason: &str| WorkloadError::Target {
        uri: uri.to_owned(),
        reason: reason.to_owned(),
    };
    if let Some(path) = uri.strip_prefix("file://") {
        if path.is_empty() {
            return Err(bad("no path"));
        }
        return Ok(Target::File { path: path.into() });
    }
    if uri.starts_with('/') || uri.starts_with("./") || uri.starts_with("../") {
        return Ok(Target::File { path: uri.into() });
    }
    let Some(rest) = uri.strip_prefix("nbd://") else {
        return Err(bad(
            "expected nbd://HOST:PORT/EXPORT, or a file or block device (/path, ./path or file://path)",
        ));
    };
    let (host_port, export) = rest.split_once('/').unwrap_or((rest, ""));
    if host_port.is_empty() {
        return Err(bad("no host"));
    }
    let address = if host_port.starts_with('[') || !host_port.contains(':') {
        // `[::1]:10809` keeps its port; a bare host gets the default one.
        if host_port.ends_with(']') || !host_port.contains(':') {
            format!("{host_port}:{NBD_PORT_DEFAULT}")
        } else {
            host_port.to_owned()
        }
    } else {
        host_port.to_owned()
    };
    Ok(Target::Nbd {
        address,
        export: export.to_owned(),
    })
}

/// A checked workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub target: Target,
    pub read_write: ReadWrite,
    /// Percentage of operations that read (100 for read-only patterns, 0 for write-only ones).
    pub read_percent: u8,
    pub block_sizes: BlockSizeMix,
    pub queue_depth: usize,
    pub connections: usize,
    /// Total open-loop rate limit, if any.
    pub rate_iops: Option<u64>,
    pub duration: Option<Duration>,
    /// Warm-up before the measured run: operations run but are neither counted nor recorded, and
    /// `duration` and `ops_total` apply to what follows.
    pub ramp: Duration,
    pub ops_total: Option<u64>,
    pub verify: bool,
    pub poll: PollMode,
    /// Bytes of the export to use, from offset 0; `None` means the whole export.
    pub range_bytes: Option<u64>,
    pub seed: u64,
}

impl Workload {
    /// The slice of the range that connection `index` works in: connections never touch each other's
    /// blocks, so that `--verify` never sees a write racing a read. Also checks the range against the
    /// export size.
    pub fn region(&self, index: usize, export_bytes: u64) -> Result<(u64, u64), WorkloadError> {
        let range_bytes = self.range_bytes.unwrap_or(export_bytes);
        if range_bytes > export_bytes {
            return Err(WorkloadError::RangeBeyondExport {
                range_bytes,
                export_bytes,
            });
        }
        let block_size_max_bytes = self.block_sizes.size_max_bytes();
        let per_connection = range_bytes / self.connections as u64;
        let region_bytes = per_connection - per_connection % u64::from(block_size_max_bytes);
        if region_bytes == 0 {
            return Err(WorkloadError::RangeTooSmall {
                range_bytes,
                connections: self.connections,
                block_size_max_bytes,
            });
        }
        Ok((region_bytes * index as u64, region_bytes))
    }

    /// Operations connection `index` performs under `--ops`.
    pub fn ops_for_connection(&self, index: usize) -> Option<u64> {
        self.ops_total.map(|total| {
            let connections = self.connections as u64;
            total / connections + u64::from((index as u64) < total % connections)
        })
    }
}

/// Checks the remaining numeric flags.
pub fn check_counts(
    queue_depth: usize,
    connections: usize,
    ops_total: Option<u64>,
    duration: Option<Duration>,
) -> Result<(), WorkloadError> {
    if queue_depth == 0 || queue_depth > QUEUE_DEPTH_MAX {
        return Err(WorkloadError::QueueDepth(queue_depth));
    }
    if connections == 0 || connections > CONNECTIONS_MAX {
        return Err(WorkloadError::Connections(connections));
    }
    if ops_total == Some(0) {
        return Err(WorkloadError::ZeroOps);
    }
    if ops_total.is_none() && duration.is_none() {
        return Err(WorkloadError::NoStopCondition);
    }
    Ok(())
}

/// Parses `--ramp`: a duration like `--time`, or 0 for none.
pub fn parse_ramp(text: &str) -> Result<Duration, WorkloadError> {
    if matches!(text.trim(), "0" | "0s" | "0ms") {
        return Ok(Duration::ZERO);
    }
    parse_duration(text).map_err(|error| match error {
        WorkloadError::Duration { text, reason } => WorkloadError::Ramp { text, reason },
        other => other,
    })
}

/// Parses `--size`: a size like 64M, a multiple of 512.
pub fn parse_range(text: &str) -> Result<u64, WorkloadError> {
    parse_size(text).map_err(|reason| WorkloadError::Range {
        text: text.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_block_sizes_parse() {
        let mix = parse_block_size_mix("4k").expect("4k");
        assert_eq!(mix.entries(), &[(4096, 100)]);
        assert_eq!(mix.size_max_bytes(), 4096);
        assert_eq!(
            parse_block_size_mix("512").expect("512").entries(),
            &[(512, 100)]
        );
        assert_eq!(
            parse_block_size_mix("1M").expect("1M").entries(),
            &[(1 << 20, 100)]
        );
    }

    #[test]
    fn weighted_mixes_parse_and_pick_by_weight() {
        let mix = parse_block_size_mix("4k:60, 64k:40").expect("mix");
        assert_eq!(mix.entries(), &[(4096, 60), (65536, 40)]);
        assert_eq!(mix.size_max_bytes(), 65536);
        assert_eq!(mix.describe(), "4096:60,65536:40");
        let picks: Vec<u32> = (0..100).map(|draw| mix.pick(draw)).collect();
        assert_eq!(picks.iter().filter(|&&size| size == 4096).count(), 60);
        assert_eq!(picks.iter().filter(|&&size| size == 65536).count(), 40);
    }

    #[test]
    fn bad_block_sizes_are_refused() {
        for bad in [
            "",
            "0",
            "1000",
            "4k:60,64k:30",
            "4k:60,64k:50",
            "4k,64k:50",
            "4k:0,64k:100",
            "4k:50,4k:50",
            "4k:x",
            "64M",
            "4k:-5,64k:105",
            "abc",
        ] {
            assert!(
                parse_block_size_mix(bad).is_err(),
                "--bs {bad:?} should be refused"
            );
        }
    }

    #[test]
    fn read_percent_is_a_percentage() {
        assert_eq!(parse_read_percent(0), Ok(0));
        assert_eq!(parse_read_percent(70), Ok(70));
        assert_eq!(parse_read_percent(100), Ok(100));
        assert_eq!(
            parse_read_percent(101),
            Err(WorkloadError::ReadPercent(101))
        );
        assert!(parse_read_percent(u32::MAX).is_err());
        assert_eq!(ReadWrite::Randread.read_percent(30), 100);
        assert_eq!(ReadWrite::Write.read_percent(30), 0);
        assert_eq!(ReadWrite::Randrw.read_percent(30), 30);
    }

    #[test]
    fn rates_parse_with_decimal_multipliers() {
        assert_eq!(parse_rate("5000"), Ok(5000));
        assert_eq!(parse_rate("20k"), Ok(20_000));
        assert_eq!(parse_rate("2M"), Ok(2_000_000));
        for bad in ["", "0", "-1", "1.5k", "k", "101m", "99999999999999999999"] {
            assert!(parse_rate(bad).is_err(), "--rate {bad:?} should be refused");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "0s", "s", "1.5s", "10x", "9999h"] {
            assert!(
                parse_duration(bad).is_err(),
                "--time {bad:?} should be refused"
            );
        }
    }

    #[test]
    fn counts_and_stop_conditions_are_checked() {
        let ten_seconds = Some(Duration::from_secs(10));
        assert_eq!(check_counts(8, 1, Some(10), None), Ok(()));
        assert_eq!(check_counts(8, 1, None, ten_seconds), Ok(()));
        assert_eq!(
            check_counts(0, 1, Some(10), None),
            Err(WorkloadError::QueueDepth(0))
        );
        assert!(check_counts(QUEUE_DEPTH_MAX + 1, 1, Some(10), None).is_err());
        assert_eq!(
            check_counts(1, 0, Some(10), None),
            Err(WorkloadError::Connections(0))
        );
        assert_eq!(
            check_counts(1, 1, Some(0), None),
            Err(WorkloadError::ZeroOps)
        );
        assert_eq!(
            check_counts(1, 1, None, None),
            Err(WorkloadError::NoStopCondition)
        );
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            parse_target("nbd://127.0.0.1:4000/vol0"),
            Ok(Target::Nbd {
                address: "127.0.0.1:4000".into(),
                export: "vol0".into()
            })
        );
        assert_eq!(
            parse_target("nbd://localhost"),
            Ok(Target::Nbd {
                address: "localhost:10809".into(),
                export: String::new()
            })
        );
        assert_eq!(
            parse_target("/dev/nvme0n1"),
            Ok(Target::File {
                path: "/dev/nvme0n1".into()
            })
        );
        assert_eq!(
            parse_target("file://disk.img"),
            Ok(Target::File {
                path: "disk.img".into()
            })
        );
        assert!(parse_target("disk.img").is_err());
        assert!(parse_target("http://host/x").is_err());
        assert!(parse_target("nbd:///vol0").is_err());
    }

    #[test]
    fn ramp_takes_zero_and_durations() {
        assert_eq!(parse_ramp("0"), Ok(Duration::ZERO));
        assert_eq!(parse_ramp("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_ramp("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_ramp("500ms"), Ok(Duration::from_millis(500)));
        assert!(matches!(
            parse_ramp("soon"),
            Err(WorkloadError::Ramp { .. })
        ));
    }

    #[test]
    fn regions_split_the_range_between_connections() {
        let workload = Workload {
            target: Target::Nbd {
                address: "127.0.0.1:1".into(),
                export: String::new(),
            },
            read_write: ReadWrite::Randrw,
            read_percent: 50,
            block_sizes: parse_block_size_mix("4k:50,64k:50").expect("mix"),
            queue_depth: 8,
            connections: 3,
            rate_iops: None,
            ramp: Duration::ZERO,
            duration: None,
            ops_total: Some(10),
            verify: true,
            poll: PollMode::Busy,
            range_bytes: Some(1 << 20),
            seed: 1,
        };
        let (start0, len0) = workload.region(0, 64 << 20).expect("region 0");
        let (start2, len2) = workload.region(2, 64 << 20).expect("region 2");
        assert_eq!((start0, len0), (0, 5 * 65536));
        assert_eq!((start2, len2), (10 * 65536, 5 * 65536));
        assert!(workload.region(0, 512 << 10).is_err());
        let counts: Vec<u64> = (0..3)
            .map(|index| workload.ops_for_connection(index).expect("ops"))
            .collect();
        assert_eq!(counts, vec![4, 3, 3]);
    }
}
