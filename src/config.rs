//! Command line: every flag, its default, and the validation that turns text into a `ServeConfig`.
//!
//! Owns: parsing and checking of user input before anything starts. Must never: start threads, open
//! files or sockets (that is `server`'s job), or accept a value it cannot honour: a bad value is an error
//! naming the flag, and the process exits with code 2 (clap's usage-error code).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::reactor::PollMode;
use crate::volume::copy::Durability;
use crate::volume::open::DEFAULT_VOLUME_SIZE;

/// Largest volume size accepted (4 EiB): far beyond any device, small enough that offset arithmetic
/// never overflows.
pub const VOLUME_SIZE_MAX: u64 = 1 << 62;
/// Volume sizes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, Parser)]
#[command(
    name = "ferroblock",
    version,
    about = "A polled-mode userland block storage target"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a volume over NBD (default: a persistent 1 GiB `vol0` in ./ferroblock-data, at 127.0.0.1:10809).
    Serve(ServeArgs),
    /// Measure latency and throughput of any NBD server (a load generator).
    Bench(crate::loadgen::BenchArgs),
    /// Draw `bench --hist` interval logs: latency by percentile and IOPS over time, as SVG and PNG.
    Plot(crate::plot::PlotArgs),
    /// Set up a replicated cluster (`cluster init`).
    Cluster(crate::cluster::command::ClusterArgs),
    /// Show each volume's epoch and, per peer, its role, op number, commit watermark and lag.
    Status(crate::cluster::command::StatusArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A persistent volume copy (notes, op numbers, group commit, crash recovery) in a file or block
    /// device, through io_uring with O_DIRECT.
    File,
    /// Sparse memory: fast, lost at exit.
    Memory,
    /// A raw image file or block device, block for block, no notes (like `nbdkit file`).
    Raw,
    /// Discards writes and reads zeros without storing anything (like SPDK's null bdev): measures pure
    /// protocol and reactor overhead.
    Null,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on for NBD clients (port 0 lets the system choose).
    #[arg(long, default_value = "127.0.0.1:10809", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Where the volume's blocks live.
    #[arg(long, value_enum, default_value_t = Backend::File)]
    pub backend: Backend,

    /// Volume size: bytes, or with a binary suffix K, M, G, T, P (512M, 1G, 1T); a multiple of 512
    /// [default: 1G for a new volume; an existing persistent volume keeps its size].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,

    /// Grow an existing persistent volume to --size (shrinking is refused).
    #[arg(long)]
    pub resize: bool,

    /// Directory holding the volumes' backing stores.
    #[arg(long, default_value = "ferroblock-data")]
    pub data_dir: PathBuf,

    /// Let the backing file of a new persistent volume grow where written instead of reserving it
    /// whole (fallocate) at creation. Saves disk; costs durable-write speed and can fail with ENOSPC
    /// later.
    #[arg(long)]
    pub sparse: bool,

    /// Free space of a new persistent volume's data area, in percent of the volume's size [default:
    /// 1/32 of it; at least 64 MiB either way]. Overwritten space is reused only after a sync, so in
    /// write-back mode a larger spare means fewer syncs under overwrites: on a disk whose flush holds
    /// up the writes behind it, 50 gave 1.19x IOPS at QD32 for 1 GiB (tuning.md §3); other modes sync
    /// every batch anyway. Chosen at creation; growing (--resize) keeps the larger of the store's
    /// spare and this one, never shrinking it; reopening with another spare is refused.
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::journal::superblock::SPARE_PERCENT_MAX)))]
    pub spare_percent: Option<u32>,

    /// When a persistent volume acknowledges writes. fdatasync and dsync: once durable (one
    /// fdatasync per batch, or RWF_DSYNC writes; FLUSH and FUA cost nothing). write-back: once on the
    /// device, like a disk with a volatile write cache (FLUSH and FUA sync; single-node volumes only).
    #[arg(long, value_enum, default_value_t = Durability::Fdatasync)]
    pub durability: Durability,

    /// Export name of the volume.
    #[arg(long, default_value = "vol0", value_parser = parse_volume_name)]
    pub volume: String,

    /// Backing file or block device [default: DATA_DIR/<volume>.fbv for file, DATA_DIR/<volume>.raw for
    /// raw].
    #[arg(long)]
    pub path: Option<PathBuf>,

    /// CPU cores to run reactors on, one pinned reactor each: a list like 0,2 or 0-3 [default: every
    /// core this process may use].
    #[arg(long, value_parser = parse_cores)]
    pub cores: Option<CoreList>,

    /// CPU cores for the kernel's io_uring workers of this process (io-wq: fsyncs, buffered writes):
    /// a list like 1 or 0-1 [default: the cores without reactors, or every core if there are none].
    #[arg(long, value_parser = parse_cores)]
    pub io_worker_cores: Option<CoreList>,

    /// How idle reactors wait: busy (spin), adaptive (spin, then sleep), interrupt (always sleep).
    #[arg(long, value_enum, default_value_t = PollMode::Adaptive)]
    pub poll: PollMode,

    /// Adaptive polling: microseconds to keep spinning after the last work before sleeping.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub spin_us: u64,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics [default: off].
    #[arg(long, value_parser = parse_listen)]
    pub metrics: Option<SocketAddr>,

    /// Cluster configuration (cluster.toml): serve as node --node of this cluster, with replicated
    /// volumes. Needs --node.
    #[arg(long, value_name = "FILE", requires = "node")]
    pub config: Option<PathBuf>,

    /// This node's id in the --config cluster. Needs --config.
    #[arg(long, value_name = "ID", requires = "config")]
    pub node: Option<String>,
}

/// A validated, de-duplicated list of core ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

impl ServeConfig {
    /// The size for stores that do not record one (memory, raw).
    pub fn size_or_default(&self) -> u64 {
        self.size_bytes.unwrap_or(DEFAULT_VOLUME_SIZE)
    }
}

/// Everything `server::serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub backend: Backend,
    /// Explicit size, if given.
    pub size_bytes: Option<u64>,
    pub resize: bool,
    pub preallocate: bool,
    /// Data-area spare of new persistent volumes, in percent of their size (`None`: the default).
    pub spare_percent: Option<u32>,
    pub durability: Durability,
    pub volume: String,
    pub path: PathBuf,
    pub cores: Vec<usize>,
    /// Cores for io-wq workers; `None`: the cores without reactors, else all.
    pub io_worker_cores: Option<Vec<usize>>,
    pub poll_mode: PollMode,
    pub spin: Duration,
    pub metrics: Option<SocketAddr>,
}

impl ServeArgs {
    pub fn into_config(self) -> ServeConfig {
        let extension = if self.backend == Backend::Raw {
            "raw"
        } else {
            "fbv"
        };
        let path = self
            .path
            .unwrap_or_else(|| self.data_dir.join(format!("{}.{extension}", self.volume)));
        let cores = match self.cores {
            Some(CoreList(cores)) => cores,
            None => available_cores(),
        };
        ServeConfig {
            listen: self.listen,
            backend: self.backend,
            size_bytes: self.size,
            resize: self.resize,
            preallocate: !self.sparse,
            spare_percent: self.spare_percent,
            durability: self.durability,
            volume: self.volume,
            path,
            cores,
            io_worker_cores: self.io_worker_cores.map(|CoreList(cores)| cores),
            poll_mode: self.poll,
            spin: Duration::from_micros(self.spin_us),
            metrics: self.metrics,
        }
    }
}

/// Core ids this process may run on.
pub fn available_cores() -> Vec<usize> {
    let mut cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|core| core.id)
        .collect();
    if cores.is_empty() {
        cores.push(0);
    }
    cores
}

pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let mut addresses = text
        .to_socket_addrs()
        .map_err(|error| format!("{text:?} is not a HOST:PORT address ({error})"))?;
    addresses
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let without_unit = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match without_unit.chars().last() {
        Some('k') => (&without_unit[..without_unit.len() - 1], 10),
        Some('m') => (&without_unit[..without_unit.len() - 1], 20),
        Some('g') => (&without_unit[..without_unit.len() - 1], 30),
        Some('t') => (&without_unit[..without_unit.len() - 1], 40),
        Some('p') => (&without_unit[..without_unit.len() - 1], 50),
        _ => (without_unit, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!(
            "{text:?} is not a size (examples: 1073741824, 512M, 1G, 1T)"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    let bytes = number
        .checked_mul(1u64 << shift)
        .filter(|&bytes| bytes <= VOLUME_SIZE_MAX);
    let Some(bytes) = bytes else {
        return Err(format!("{text:?} is larger than the maximum of 4 EiB"));
    };
    if bytes == 0 {
        return Err("the size must not be zero".into());
    }
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(format!(
            "{text:?} ({bytes} bytes) is not a multiple of {SECTOR_SIZE} bytes"
        ));
    }
    Ok(bytes)
}

pub fn parse_volume_name(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 255
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        && !text.starts_with('.');
    if !valid {
        return Err(format!(
            "{text:?} is not a volume name: use 1 to 255 letters, digits, '.', '_' or '-', not starting with '.'"
        ));
    }
    Ok(text.to_owned())
}

pub fn parse_cores(text: &str) -> Result<CoreList, String> {
    let available = available_cores();
    let mut cores = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{part:?} is not a core number or range"))
        };
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (number(first)?, number(last)?),
            None => (number(part)?, number(part)?),
        };
        if first > last {
            return Err(format!("core range {part:?} is reversed"));
        }
        for core in first..=last {
            if !available.contains(&core) {
                return Err(format!(
                    "core {core} is not available to this process (available: {available:?})"
                ));
            }
            if cores.contains(&core) {
                return Err(format!("core {core} is listed twice"));
            }
            cores.push(core);
        }
    }
    Ok(CoreList(cores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["", "12Q", "-5", "1000", "0", "1.5G", "99999999999P", "G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn cores_parse_lists_and_ranges() {
        assert_eq!(parse_cores("0"), Ok(CoreList(vec![0])));
        assert!(parse_cores("abc").is_err());
        assert!(parse_cores("0,0").is_err());
        assert!(parse_cores("1-0").is_err());
        assert!(parse_cores("100000").is_err());
    }

    #[test]
    fn volume_names_are_plain() {
        assert!(parse_volume_name("vol0").is_ok());
        assert!(parse_volume_name("../etc").is_err());
        assert!(parse_volume_name("").is_err());
        assert!(parse_volume_name("a b").is_err());
    }
}
