//! nbd-load: a minimal, fast NBD load generator for benchmarks (std + libc + hdrhistogram).
//!
//! Negotiates fixed newstyle with `NBD_OPT_GO` (simple replies only), then keeps `--qd` 4 KiB (by default)
//! random reads or writes in flight on each of `--conns` connections, one thread per connection. In
//! `--poll busy` (the default) each thread spins on its socket with `MSG_DONTWAIT` and never sleeps; in
//! `--poll interrupt` it blocks in `recv`/`poll` whenever it has nothing to send. Every completion inside
//! the measured window (after `--ramp` seconds, for `--seconds` seconds) is timed from the moment its
//! request was queued for sending to the moment its reply was parsed, and recorded in a histogram.
//!
//! Prints one JSON object on stdout: iops, mean_us, p50_us, p99_us, p999_us, max_us, cpu_percent (this
//! process's user+system time over the measured window, in percent of one core), spin_idle_percent (time
//! spent in polls that found nothing to do) and work_percent (cpu_percent minus spin_idle_percent: near
//! 100 per connection means the client, not the target, is the bottleneck).
//!
//! Usage: nbd-load --uri nbd://127.0.0.1:10809/vol0 [--rw randread|randwrite] [--bs 4096] [--qd 1]
//!        [--conns 1] [--seconds 10] [--ramp 2] [--poll busy|interrupt] [--span BYTES] [--seed N]
//!        [--cpus 1,2]

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const REQUEST_LEN: usize = 28;
const REPLY_LEN: usize = 16;
/// A connection that makes no progress for this long is reported as stalled.
const STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rw {
    RandRead,
    RandWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollMode {
    Busy,
    Interrupt,
}

#[derive(Debug, Clone)]
struct Args {
    address: String,
    export: String,
    rw: Rw,
    bs: u32,
    qd: usize,
    conns: usize,
    seconds: f64,
    ramp: f64,
    poll: PollMode,
    span: Option<u64>,
    seed: u64,
    cpus: Vec<usize>,
}

const USAGE: &str = "usage: nbd-load --uri nbd://HOST:PORT[/EXPORT] [--rw randread|randwrite] [--bs 4096] \
[--qd 1] [--conns 1] [--seconds 10] [--ramp 2] [--poll busy|interrupt] [--span BYTES] [--seed N] [--cpus 1,2]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        address: String::new(),
        export: String::new(),
        rw: Rw::RandRead,
        bs: 4096,
        qd: 1,
        conns: 1,
        seconds: 10.0,
        ramp: 2.0,
        poll: PollMode::Busy,
        span: None,
        seed: 0x5eed,
        cpus: Vec::new(),
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let value = iter
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |what: &str| format!("{flag} {value:?}: {what}");
        match flag.as_str() {
            "--uri" => {
                let rest = value
                    .strip_prefix("nbd://")
                    .ok_or_else(|| bad("expected nbd://HOST:PORT[/EXPORT]"))?;
                let (address, export) = rest.split_once('/').unwrap_or((rest, ""));
                args.address = if address.contains(':') {
                    address.to_string()
                } else {
                    format!("{address}:10809")
                };
                args.export = export.to_string();
            }
            "--rw" => {
                args.rw = match value.as_str() {
                    "randread" | "read" => Rw::RandRead,
                    "randwrite" | "write" => Rw::RandWrite,
                    _ => return Err(bad("expected randread or randwrite")),
                }
            }
            "--bs" => args.bs = value.parse().map_err(|_| bad("not a number"))?,
            "--qd" => args.qd = value.parse().map_err(|_| bad("not a number"))?,
            "--conns" => args.conns = value.parse().map_err(|_| bad("not a number"))?,
            "--seconds" => args.seconds = value.parse().map_err(|_| bad("not a number"))?,
            "--ramp" => args.ramp = value.parse().map_err(|_| bad("not a number"))?,
            "--poll" => {
                args.poll = match value.as_str() {
                    "busy" => PollMode::Busy,
                    "interrupt" => PollMode::Interrupt,
                    _ => return Err(bad("expected busy or interrupt")),
                }
            }
            "--span" => args.span = Some(value.parse().map_err(|_| bad("not a number"))?),
            "--seed" => args.seed = value.parse().map_err(|_| bad("not a number"))?,
            "--cpus" => {
                args.cpus = value
                    .split(',')
                    .map(|cpu| cpu.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad("expected a list like 1,2"))?
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if args.address.is_empty() {
        return Err(format!("--uri is required\n{USAGE}"));
    }
    if args.bs == 0 || !args.bs.is_multiple_of(512) {
        return Err("--bs must be a non-zero multiple of 512".into());
    }
    if args.qd == 0 || args.qd > 65536 || args.conns == 0 {
        return Err("--qd must be 1..=65536 and --conns at least 1".into());
    }
    if !(args.seconds > 0.0 && args.ramp >= 0.0) {
        return Err("--seconds must be positive and --ramp non-negative".into());
    }
    Ok(args)
}

fn read_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes[..2].try_into().expect("2 bytes"))
}
fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}
fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Fixed-newstyle handshake ending in NBD_OPT_GO; returns the export size.
fn handshake(stream: &mut TcpStream, export: &str) -> io::Result<u64> {
    let protocol = |message: String| io::Error::new(io::ErrorKind::InvalidData, message);
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting)?;
    if read_u64(&greeting) != NBDMAGIC || read_u64(&greeting[8..]) != IHAVEOPT {
        return Err(protocol(
            "not a newstyle NBD server (bad greeting magic)".into(),
        ));
    }
    let server_flags = read_u16(&greeting[16..]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server does not speak fixed newstyle".into()));
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    let mut option = Vec::with_capacity(64 + export.len());
    option.extend_from_slice(&client_flags.to_be_bytes());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    let data_len =
        u32::try_from(4 + export.len() + 2).map_err(|_| protocol("export name too long".into()))?;
    option.extend_from_slice(&data_len.to_be_bytes());
    option.extend_from_slice(&(export.len() as u32).to_be_bytes());
    option.extend_from_slice(export.as_bytes());
    option.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&option)?;

    let mut size = None;
    loop {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header)?;
        if read_u64(&header) != OPTION_REPLY_MAGIC {
            return Err(protocol("bad option reply magic".into()));
        }
        let reply_type = read_u32(&header[12..]);
        let length = read_u32(&header[16..]) as usize;
        if length > 1 << 20 {
            return Err(protocol(format!("option reply of {length} bytes")));
        }
        let mut data = vec![0u8; length];
        stream.read_exact(&mut data)?;
        match reply_type {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && read_u16(&data) == INFO_EXPORT => {
                size = Some(read_u64(&data[2..]));
            }
            REP_INFO => {}
            error if error & (1 << 31) != 0 => {
                return Err(protocol(format!(
                    "NBD_OPT_GO for export {export:?} refused ({error:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            other => return Err(protocol(format!("unexpected option reply type {other}"))),
        }
    }
    size.ok_or_else(|| protocol("NBD_OPT_GO finished without NBD_INFO_EXPORT".into()))
}

/// xorshift64*: enough randomness for offsets and payloads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and CPU_SET/sched_setaffinity only
    // read and write that local set (pid 0 means the calling thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// send(2) or recv(2) result: bytes moved, or `None` when it would block.
fn syscall_result(result: isize) -> io::Result<Option<usize>> {
    if result >= 0 {
        return Ok(Some(result as usize));
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(error),
    }
}

fn send_some(fd: i32, bytes: &[u8]) -> io::Result<Option<usize>> {
    // SAFETY: the pointer and length describe a live slice that send only reads.
    let result = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    syscall_result(result)
}

fn recv_some(fd: i32, buffer: &mut [u8], block: bool) -> io::Result<Option<usize>> {
    let flags = if block { 0 } else { libc::MSG_DONTWAIT };
    // SAFETY: the pointer and length describe a live, writable slice that recv fills at most.
    let result = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), flags) };
    syscall_result(result)
}

fn wait_writable_or_readable(fd: i32) -> io::Result<()> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, owned by this frame.
    let result = unsafe { libc::poll(&mut pollfd, 1, STALL_LIMIT.as_millis() as i32) };
    if result < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(())
}

/// One connection's figures.
struct Outcome {
    histogram: Histogram<u64>,
    /// Wall time inside the measured window spent in loop iterations that moved no byte (spinning).
    idle_nanos: u64,
    /// Wall time inside the measured window spent in iterations that sent or received something.
    busy_nanos: u64,
}

struct Window {
    measure_start: Instant,
    end: Instant,
}

/// What a connection thread needs from `main`: a count of negotiated connections, and the time window
/// that `main` publishes once all of them are ready.
struct Start {
    ready: AtomicUsize,
    window: OnceLock<Window>,
}

#[derive(Clone, Copy)]
struct Slot {
    started: Instant,
    busy: bool,
}

fn run_connection(args: &Args, index: usize, start: &Start) -> io::Result<Outcome> {
    if !args.cpus.is_empty() {
        pin_current_thread(args.cpus[index % args.cpus.len()])?;
    }
    let mut stream = TcpStream::connect(&args.address)?;
    stream.set_nodelay(true)?;
    let size = handshake(&mut stream, &args.export)?;
    // A stalled server turns blocking receives into errors instead of a hang.
    stream.set_read_timeout(Some(STALL_LIMIT))?;
    let fd = stream.as_raw_fd();
    let span = args.span.unwrap_or(size).min(size);
    let blocks = span / u64::from(args.bs);
    if blocks == 0 {
        return Err(io::Error::other(format!(
            "export of {size} bytes is smaller than one block"
        )));
    }
    let bs = args.bs as usize;
    let is_write = args.rw == Rw::RandWrite;
    let mut rng = Rng(args
        .seed
        .wrapping_add((index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        | 1);
    let payload: Vec<u8> = (0..bs).map(|_| rng.next() as u8 | 1).collect();

    start.ready.fetch_add(1, Ordering::SeqCst);
    let window = loop {
        if let Some(window) = start.window.get() {
            break window;
        }
        thread::sleep(Duration::from_millis(1));
    };

    let now0 = Instant::now();
    let mut slots = vec![
        Slot {
            started: now0,
            busy: false
        };
        args.qd
    ];
    let mut free: Vec<usize> = (0..args.qd).rev().collect();
    let mut out: Vec<u8> =
        Vec::with_capacity(args.qd * (REQUEST_LEN + if is_write { bs } else { 0 }));
    let mut out_pos = 0usize;
    let in_capacity = (4 * (REPLY_LEN + bs)).max(1 << 20);
    let mut input = vec![0u8; in_capacity];
    let (mut in_start, mut in_end) = (0usize, 0usize);
    let mut in_flight = 0usize;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)
        .map_err(|error| io::Error::other(error.to_string()))?;
    let mut stopping = false;
    let mut last_progress = now0;
    let (mut idle_nanos, mut busy_nanos) = (0u64, 0u64);
    let (mut previous_now, mut previous_progress) = (now0, true);

    loop {
        let now = Instant::now();
        if previous_now >= window.measure_start && now <= window.end {
            let nanos = now.duration_since(previous_now).as_nanos() as u64;
            if previous_progress {
                busy_nanos += nanos;
            } else {
                idle_nanos += nanos;
            }
        }
        previous_now = now;
        if !stopping && now >= window.end {
            stopping = true;
        }
        if !stopping {
            while let Some(slot) = free.pop() {
                let offset = (rng.next() % blocks) * u64::from(args.bs);
                out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes());
                out.extend_from_slice(&(if is_write { CMD_WRITE } else { CMD_READ }).to_be_bytes());
                out.extend_from_slice(&(slot as u64).to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&args.bs.to_be_bytes());
                if is_write {
                    out.extend_from_slice(&payload);
                }
                slots[slot] = Slot {
                    started: now,
                    busy: true,
                };
                in_flight += 1;
            }
        }
        let mut progress = false;
        if out_pos < out.len() {
            if let Some(sent) = send_some(fd, &out[out_pos..])? {
                out_pos += sent;
                progress = sent > 0;
            }
            if out_pos == out.len() {
                out.clear();
                out_pos = 0;
            }
        }
        if in_flight == 0 {
            if stopping {
                break;
            }
            continue;
        }
        // Interrupt mode blocks in recv once everything is sent; otherwise poll without waiting.
        let block = args.poll == PollMode::Interrupt && out.is_empty();
        if in_start == in_end {
            in_start = 0;
            in_end = 0;
        } else if in_capacity - in_end < REPLY_LEN + bs {
            input.copy_within(in_start..in_end, 0);
            in_end -= in_start;
            in_start = 0;
        }
        match recv_some(fd, &mut input[in_end..], block) {
            Ok(Some(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("server closed the connection with {in_flight} requests in flight"),
                ));
            }
            Ok(Some(received)) => {
                in_end += received;
                progress = true;
            }
            Ok(None) => {}
            Err(error) => return Err(error),
        }
        if in_end - in_start >= REPLY_LEN {
            let done_at = Instant::now();
            while in_end - in_start >= REPLY_LEN {
                let header = &input[in_start..in_start + REPLY_LEN];
                let magic = read_u32(header);
                if magic != SIMPLE_REPLY_MAGIC {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad reply magic {magic:#x}"),
                    ));
                }
                let error = read_u32(&header[4..]);
                let cookie = read_u64(&header[8..]) as usize;
                if cookie >= slots.len() || !slots[cookie].busy {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("reply for unknown cookie {cookie}"),
                    ));
                }
                if error != 0 {
                    return Err(io::Error::other(format!(
                        "server returned NBD error {error} for a {}",
                        if is_write { "write" } else { "read" }
                    )));
                }
                let total = if is_write { REPLY_LEN } else { REPLY_LEN + bs };
                if in_end - in_start < total {
                    break;
                }
                in_start += total;
                let slot = &mut slots[cookie];
                slot.busy = false;
                in_flight -= 1;
                free.push(cookie);
                if done_at >= window.measure_start && done_at < window.end {
                    let nanos = done_at.duration_since(slot.started).as_nanos() as u64;
                    histogram.saturating_record(nanos.max(1));
                }
            }
        }
        previous_progress = progress;
        if progress {
            last_progress = now;
        } else {
            if now.duration_since(last_progress) > STALL_LIMIT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no progress for {STALL_LIMIT:?} with {in_flight} requests in flight"),
                ));
            }
            if args.poll == PollMode::Interrupt && !out.is_empty() {
                wait_writable_or_readable(fd)?;
            }
        }
    }
    // Polite goodbye: NBD_CMD_DISC, then close.
    let mut disc = [0u8; REQUEST_LEN];
    disc[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    disc[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
    let _ = stream.set_nonblocking(false);
    let _ = stream.write_all(&disc);
    Ok(Outcome {
        histogram,
        idle_nanos,
        busy_nanos,
    })
}

fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (seconds(usage.ru_utime), seconds(usage.ru_stime))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => Arc::new(args),
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let start = Arc::new(Start {
        ready: AtomicUsize::new(0),
        window: OnceLock::new(),
    });
    let handles: Vec<_> = (0..args.conns)
        .map(|index| {
            let (args, start) = (args.clone(), start.clone());
            thread::Builder::new()
                .name(format!("nbd-load-{index}"))
                .spawn(move || run_connection(&args, index, &start))
                .expect("spawn a connection thread")
        })
        .collect();
    // Wait until every connection has negotiated; a connection that fails first ends the run.
    while start.ready.load(Ordering::SeqCst) < args.conns {
        if handles.iter().any(|handle| handle.is_finished()) {
            for handle in handles.into_iter().filter(|handle| handle.is_finished()) {
                match handle.join() {
                    Ok(Err(error)) => eprintln!("nbd-load: {error}"),
                    Ok(Ok(_)) => eprintln!("nbd-load: a connection ended before the run started"),
                    Err(_) => eprintln!("nbd-load: a connection thread panicked"),
                }
            }
            return ExitCode::from(1);
        }
        thread::sleep(Duration::from_millis(1));
    }
    let run_start = Instant::now();
    let measure_start = run_start + Duration::from_secs_f64(args.ramp);
    let end = measure_start + Duration::from_secs_f64(args.seconds);
    let _ = start.window.set(Window { measure_start, end });

    thread::sleep(measure_start.saturating_duration_since(Instant::now()));
    let (user0, sys0) = cpu_seconds();
    let cpu_start = Instant::now();
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let (user1, sys1) = cpu_seconds();
    let cpu_wall = cpu_start.elapsed().as_secs_f64();

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3).expect("bounds");
    let (mut idle_nanos, mut busy_nanos) = (0u64, 0u64);
    let mut failed = false;
    for handle in handles {
        match handle.join() {
            Ok(Ok(outcome)) => {
                histogram.add(&outcome.histogram).expect("same bounds");
                idle_nanos += outcome.idle_nanos;
                busy_nanos += outcome.busy_nanos;
            }
            Ok(Err(error)) => {
                eprintln!("nbd-load: {error}");
                failed = true;
            }
            Err(_) => {
                eprintln!("nbd-load: a connection thread panicked");
                failed = true;
            }
        }
    }
    if failed {
        return ExitCode::from(1);
    }
    let us = |nanos: u64| nanos as f64 / 1000.0;
    let cpu_percent = 100.0 * ((user1 - user0) + (sys1 - sys0)) / cpu_wall;
    // Spinning without work is CPU time but not load: `work_percent` is the CPU share that did work, so a
    // busy-polling client shows whether it, rather than the target, was the bottleneck. Wall-time shares
    // scale the CPU time, so that time lost to preemption is spread over both kinds of iteration.
    let looped = (idle_nanos + busy_nanos).max(1) as f64;
    let idle_percent = cpu_percent * idle_nanos as f64 / looped;
    let ops = histogram.len();
    let json = format!(
        concat!(
            "{{\"client\":\"nbd-load\",\"rw\":\"{rw}\",\"bs\":{bs},\"qd\":{qd},\"conns\":{conns},",
            "\"poll\":\"{poll}\",\"seconds\":{seconds},\"ops\":{ops},",
            "\"iops\":{iops:.1},\"mean_us\":{mean:.2},\"p50_us\":{p50:.2},\"p99_us\":{p99:.2},",
            "\"p999_us\":{p999:.2},\"max_us\":{max:.2},\"cpu_percent\":{cpu:.1},",
            "\"user_percent\":{user:.1},\"sys_percent\":{sys:.1},\"spin_idle_percent\":{idle:.1},",
            "\"work_percent\":{work:.1}}}"
        ),
        rw = if args.rw == Rw::RandWrite {
            "randwrite"
        } else {
            "randread"
        },
        bs = args.bs,
        qd = args.qd,
        conns = args.conns,
        poll = if args.poll == PollMode::Busy {
            "busy"
        } else {
            "interrupt"
        },
        seconds = args.seconds,
        ops = ops,
        iops = ops as f64 / args.seconds,
        mean = histogram.mean() / 1000.0,
        p50 = us(histogram.value_at_quantile(0.50)),
        p99 = us(histogram.value_at_quantile(0.99)),
        p999 = us(histogram.value_at_quantile(0.999)),
        max = us(histogram.max()),
        cpu = cpu_percent,
        user = 100.0 * (user1 - user0) / cpu_wall,
        sys = 100.0 * (sys1 - sys0) / cpu_wall,
        idle = idle_percent,
        work = cpu_percent * busy_nanos as f64 / looped,
    );
    println!("{json}");
    ExitCode::SUCCESS
}
