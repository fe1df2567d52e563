//! In-process benchmark of a persistent volume copy: drives `VolumeCopy` through its own io_uring at a
//! fixed queue depth, polling completions, with no network in between, so that its figures compare
//! directly with `fio --ioengine=io_uring --direct=1` on the same file system. A poll that finds nothing
//! yields the CPU (`sched_yield`), as the server's adaptive reactor does: the copy's fsyncs run on
//! io-wq workers that may share the core, and a pure spin would hold it against them (fio waits in
//! io_uring_enter instead). `--spin` polls without yielding.
//!
//! cargo run --release --example volume-bench -- --path /var/tmp/v.fbv --size 1G --rw randwrite \
//!     --bs 4096 --qd 32 --seconds 10 [--ramp 0] [--durability fdatasync|dsync|write-back] [--ops N] [--prefill]
//!     [--recover] [--spin]
//!
//! Prints one JSON object: iops, mean/p50/p99 latency, write amplification (device bytes written per
//! host byte), syncs per write, checkpoints taken, the journal's size, and with --recover the time to
//! reopen (recover) the store afterwards and how many journal blocks that recovery replayed.
//!
//! --ramp runs the workload that many seconds first, unmeasured (like fio's --ramp_time); --ops counts
//! only measured operations. --prefill first writes the whole volume once, sequentially, in 1 MiB writes
//! at QD 8 (whatever --bs and --qd say), unmeasured.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferroblock::io::AlignedBuf;
use ferroblock::io::device::UringDevice;
use ferroblock::io::uring::Uring;
use ferroblock::volume::copy::Durability;
use ferroblock::volume::open::open_copy;
use ferroblock::volume::{IoCompletion, IoFlags, IoKind, IoRequest, Origin};

struct Options {
    path: PathBuf,
    size: u64,
    write: bool,
    block: u32,
    queue_depth: usize,
    seconds: f64,
    ramp: f64,
    ops: u64,
    durability: Durability,
    prefill: bool,
    recover: bool,
    spin: bool,
}

fn parse() -> Options {
    let mut options = Options {
        path: PathBuf::from("volume-bench.fbv"),
        size: 1 << 30,
        write: true,
        block: 4096,
        queue_depth: 1,
        seconds: 10.0,
        ramp: 0.0,
        ops: u64::MAX,
        durability: Durability::Fdatasync,
        prefill: false,
        recover: false,
        spin: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut index = 0;
    while index < args.len() {
        let value = || {
            args.get(index + 1)
                .cloned()
                .unwrap_or_else(|| panic!("{} needs a value", args[index]))
        };
        match args[index].as_str() {
            "--path" => options.path = PathBuf::from(value()),
            "--size" => options.size = ferroblock::config::parse_size(&value()).expect("--size"),
            "--rw" => options.write = value() == "randwrite",
            "--bs" => {
                options.block = ferroblock::config::parse_size(&value()).expect("--bs") as u32
            }
            "--qd" => options.queue_depth = value().parse().expect("--qd"),
            "--seconds" => options.seconds = value().parse().expect("--seconds"),
            "--ramp" => options.ramp = value().parse().expect("--ramp"),
            "--ops" => options.ops = value().parse().expect("--ops"),
            "--durability" => {
                options.durability = match value().as_str() {
                    "dsync" => Durability::Dsync,
                    "write-back" => Durability::WriteBack,
                    "fdatasync" => Durability::Fdatasync,
                    other => panic!("unknown --durability {other}"),
                }
            }
            "--prefill" => {
                options.prefill = true;
                index -= 1;
            }
            "--recover" => {
                options.recover = true;
                index -= 1;
            }
            "--spin" => {
                options.spin = true;
                index -= 1;
            }
            other => panic!("unknown option {other}"),
        }
        index += 2;
    }
    options
}

/// A tiny xorshift generator: benchmark offsets, nothing more.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    let options = parse();
    let preallocate = std::env::var_os("PREALLOCATE").is_some();
    let opened = open_copy(
        &options.path,
        "bench",
        Some(options.size),
        false,
        options.durability,
        preallocate,
        None,
    )
    .unwrap_or_else(|error| panic!("{error}"));
    let fd = std::os::fd::AsRawFd::as_raw_fd(&opened.file);
    let mut copy = opened.copy;
    let mut uring = Uring::new().expect("io_uring");
    let mut done: VecDeque<IoCompletion> = VecDeque::new();
    let mut completions: Vec<(u64, i32)> = Vec::with_capacity(1024);
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");

    let mut run = |copy: &mut ferroblock::volume::copy::VolumeCopy,
                   kind: IoKind,
                   block_bytes: u32,
                   queue_depth: usize,
                   sequential: bool,
                   limit_ops: u64,
                   limit: Duration,
                   record: bool|
     -> (u64, f64) {
        let blocks = options.size / u64::from(block_bytes);
        let mut free: Vec<(AlignedBuf, u16)> = (0..queue_depth)
            .map(|slot| {
                let mut buf = AlignedBuf::with_capacity(block_bytes as usize);
                buf.set_len(block_bytes as usize);
                buf.as_mut_slice().fill(slot as u8 ^ 0x5a);
                (buf, slot as u16)
            })
            .collect();
        let mut started_at = vec![Instant::now(); queue_depth];
        let start = Instant::now();
        let (mut issued, mut finished, mut next_block) = (0u64, 0u64, 0u64);
        loop {
            let elapsed = start.elapsed();
            // A sequential pass ends at the end of the volume (not only at its op or time limit).
            let more =
                issued < limit_ops && elapsed < limit && !(sequential && next_block >= blocks);
            while more && !free.is_empty() && issued < limit_ops {
                let (buf, slot) = free.pop().expect("free slot");
                let block = if sequential {
                    next_block
                } else {
                    random.next() % blocks
                };
                next_block += 1;
                if sequential && next_block > blocks {
                    free.push((buf, slot));
                    break;
                }
                started_at[usize::from(slot)] = Instant::now();
                let request = IoRequest {
                    volume: 0,
                    kind,
                    flags: IoFlags::empty(),
                    offset: block * u64::from(block_bytes),
                    length: block_bytes,
                    buf,
                    origin: Origin {
                        reactor: 0,
                        slot,
                        connection: 0,
                        generation: 0,
                    },
                };
                copy.submit(
                    request,
                    &mut UringDevice {
                        uring: &mut uring,
                        fd,
                        volume: 0,
                    },
                    &mut done,
                );
                issued += 1;
            }
            copy.end_iteration(
                &mut UringDevice {
                    uring: &mut uring,
                    fd,
                    volume: 0,
                },
                &mut done,
            );
            uring.submit().expect("submit");
            completions.clear();
            if uring.reap_into(&mut completions) == 0 && done.is_empty() && !options.spin {
                std::thread::yield_now();
            }
            for &(user_data, result) in &completions {
                copy.complete(
                    user_data as u32,
                    result,
                    &mut UringDevice {
                        uring: &mut uring,
                        fd,
                        volume: 0,
                    },
                    &mut done,
                );
            }
            while let Some(completion) = done.pop_front() {
                completion.result.expect("benchmark IO failed");
                let slot = completion.origin.slot;
                if record {
                    histogram
                        .record(started_at[usize::from(slot)].elapsed().as_nanos() as u64)
                        .expect("record");
                }
                free.push((completion.buf, slot));
                finished += 1;
            }
            if !more && finished == issued {
                return (finished, start.elapsed().as_secs_f64());
            }
        }
    };

    // 1 MiB at QD 8: a QD1 4 KiB prefill of a 1 GiB volume is 262144 durable writes, minutes of them.
    let prefill_started = Instant::now();
    if options.prefill {
        run(
            &mut copy,
            IoKind::Write,
            1 << 20,
            8,
            true,
            u64::MAX,
            Duration::from_secs(3600),
            false,
        );
    }
    let kind = if options.write {
        IoKind::Write
    } else {
        IoKind::Read
    };
    let limit = Duration::from_secs_f64(options.seconds);
    let prefill_seconds = prefill_started.elapsed().as_secs_f64();
    if options.ramp > 0.0 {
        run(
            &mut copy,
            kind,
            options.block,
            options.queue_depth,
            false,
            u64::MAX,
            Duration::from_secs_f64(options.ramp),
            false,
        );
    }
    let before = copy.stats();
    let (operations, seconds) = run(
        &mut copy,
        kind,
        options.block,
        options.queue_depth,
        false,
        options.ops,
        limit,
        true,
    );
    let after = copy.stats();
    let host_bytes = operations * u64::from(options.block);
    let device_bytes = (after.data_bytes_written - before.data_bytes_written)
        + (after.journal_bytes_written - before.journal_bytes_written);
    let committed_op = after.committed_op;
    let journal_bytes = copy.superblock().journal_bytes;
    drop(copy);
    drop(opened.file);

    let recovery = options.recover.then(|| {
        let start = Instant::now();
        let reopened = open_copy(
            &options.path,
            "bench",
            None,
            false,
            options.durability,
            false,
            None,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            reopened.copy.stats().committed_op,
            committed_op,
            "recovery reaches the last commit"
        );
        let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
        drop(reopened);
        // Not timed: a second recovery of the same (unchanged) store, for how much journal it replays.
        let superblock = reopened_superblock(&options.path);
        let reader = std::fs::File::open(&options.path).expect("open for the replay count");
        let mut read_at = |address: u64, buffer: &mut [u8]| {
            std::os::unix::fs::FileExt::read_exact_at(&reader, buffer, address)
        };
        let recovered = ferroblock::journal::recovery::recover(&superblock, &mut read_at)
            .unwrap_or_else(|error| panic!("{error}"));
        (elapsed_ms, recovered.blocks_replayed)
    });
    println!(
        "{{\"rw\":\"{}\",\"bs\":{},\"qd\":{},\"durability\":\"{:?}\",\"ops\":{},\"iops\":{:.0},\"mean_us\":{:.1},\
         \"p50_us\":{:.1},\"p99_us\":{:.1},\"write_amplification\":{:.3},\"syncs_per_write\":{:.3},\
         \"data_ios_per_write\":{:.3},\"committed_op\":{},\"checkpoints\":{},\"journal_bytes\":{},\"prefill_seconds\":{:.1},\
         \"recovery_ms\":{},\"recovery_journal_blocks\":{}}}",
        if options.write {
            "randwrite"
        } else {
            "randread"
        },
        options.block,
        options.queue_depth,
        options.durability,
        operations,
        operations as f64 / seconds,
        histogram.mean() / 1000.0,
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        if options.write && host_bytes > 0 {
            device_bytes as f64 / host_bytes as f64
        } else {
            0.0
        },
        if options.write && operations > 0 {
            (after.syncs - before.syncs) as f64 / operations as f64
        } else {
            0.0
        },
        if operations > 0 {
            (after.data_writes - before.data_writes) as f64 / operations as f64
        } else {
            0.0
        },
        committed_op,
        after.checkpoints - before.checkpoints,
        journal_bytes,
        if options.prefill {
            prefill_seconds
        } else {
            0.0
        },
        recovery.map_or("null".to_string(), |(ms, _)| format!("{ms:.1}")),
        recovery.map_or("null".to_string(), |(_, blocks)| blocks.to_string()),
    );
}

/// The superblock of the store at `path` (first sector).
fn reopened_superblock(path: &std::path::Path) -> ferroblock::journal::superblock::Superblock {
    let reader = std::fs::File::open(path).expect("open the store");
    let mut sector = [0u8; ferroblock::journal::superblock::SUPERBLOCK_BYTES];
    std::os::unix::fs::FileExt::read_exact_at(&reader, &mut sector, 0)
        .expect("read the superblock");
    ferroblock::journal::superblock::Superblock::decode(&sector)
        .unwrap_or_else(|error| panic!("{error:?}"))
}
