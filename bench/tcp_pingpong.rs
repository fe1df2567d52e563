//! tcp-pingpong: the loopback TCP round trip that an NBD request can at best hope for.
//!
//! A server thread and a client thread exchange one byte over a loopback TCP connection (TCP_NODELAY),
//! one round trip at a time, in three modes:
//! - `blocking`: both ends sleep in blocking `recv`;
//! - `server-poll`: the server spins on `recv(MSG_DONTWAIT)`, the client blocks (like a busy-polling
//!   target with an ordinary client);
//! - `both-poll`: both ends spin (like a busy-polling target with a busy-polling client).
//!
//! The server runs on `--server-cpu` (default 0) and the client on `--client-cpu` (default 1): the same
//! split as bench/nbd-compare uses. Each mode runs for `--seconds` (default 3) after 0.5 s of warm-up.
//!
//! Usage: tcp-pingpong [--seconds 3] [--server-cpu 0] [--client-cpu 1] [--modes blocking,server-poll,both-poll]
//!        [--json]
//! A CPU of -1 leaves that thread unpinned. Prints a table, or one JSON object per mode with `--json`.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Blocking,
    ServerPoll,
    BothPoll,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Blocking => "blocking",
            Mode::ServerPoll => "server-poll",
            Mode::BothPoll => "both-poll",
        }
    }
    fn server_spins(self) -> bool {
        self != Mode::Blocking
    }
    fn client_spins(self) -> bool {
        self == Mode::BothPoll
    }
}

struct Args {
    seconds: f64,
    server_cpu: i64,
    client_cpu: i64,
    modes: Vec<Mode>,
    json: bool,
}

const USAGE: &str = "usage: tcp-pingpong [--seconds 3] [--server-cpu 0] [--client-cpu 1] \
[--modes blocking,server-poll,both-poll] [--json]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 3.0,
        server_cpu: 0,
        client_cpu: 1,
        modes: vec![Mode::Blocking, Mode::ServerPoll, Mode::BothPoll],
        json: false,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        match flag.as_str() {
            "--json" => {
                args.json = true;
                continue;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ => {}
        }
        let value = iter
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("{flag} {value:?}: invalid value\n{USAGE}");
        match flag.as_str() {
            "--seconds" => args.seconds = value.parse().map_err(|_| bad())?,
            "--server-cpu" => args.server_cpu = value.parse().map_err(|_| bad())?,
            "--client-cpu" => args.client_cpu = value.parse().map_err(|_| bad())?,
            "--modes" => {
                args.modes = value
                    .split(',')
                    .map(|mode| match mode.trim() {
                        "blocking" => Ok(Mode::Blocking),
                        "server-poll" => Ok(Mode::ServerPoll),
                        "both-poll" => Ok(Mode::BothPoll),
                        _ => Err(bad()),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if args.seconds <= 0.0 {
        return Err("--seconds must be positive".into());
    }
    Ok(args)
}

fn pin_current_thread(cpu: i64) -> io::Result<()> {
    if cpu < 0 {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and CPU_SET/sched_setaffinity only
    // read and write that local set (pid 0 means the calling thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives exactly one byte, spinning with MSG_DONTWAIT or blocking. `Ok(false)` on end of stream.
fn recv_byte(fd: i32, spin: bool) -> io::Result<bool> {
    let flags = if spin { libc::MSG_DONTWAIT } else { 0 };
    let mut byte = 0u8;
    loop {
        // SAFETY: one writable byte owned by this frame.
        let result = unsafe { libc::recv(fd, (&raw mut byte).cast(), 1, flags) };
        if result == 1 {
            return Ok(true);
        }
        if result == 0 {
            return Ok(false);
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {
                if spin {
                    std::hint::spin_loop();
                }
            }
            _ => return Err(error),
        }
    }
}

fn send_byte(fd: i32) -> io::Result<()> {
    let byte = 1u8;
    loop {
        // SAFETY: one readable byte owned by this frame.
        let result = unsafe { libc::send(fd, (&raw const byte).cast(), 1, libc::MSG_NOSIGNAL) };
        if result == 1 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

struct Figures {
    round_trips: usize,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    min_us: f64,
}

fn run_mode(mode: Mode, args: &Args) -> io::Result<Figures> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let server_cpu = args.server_cpu;
    let server = thread::Builder::new()
        .name("pingpong-server".into())
        .spawn(move || -> io::Result<()> {
            pin_current_thread(server_cpu)?;
            let (stream, _) = listener.accept()?;
            stream.set_nodelay(true)?;
            let fd = stream.as_raw_fd();
            while recv_byte(fd, mode.server_spins())? {
                send_byte(fd)?;
            }
            Ok(())
        })?;
    pin_current_thread(args.client_cpu)?;
    let stream = TcpStream::connect(address)?;
    stream.set_nodelay(true)?;
    let fd = stream.as_raw_fd();
    let warmup_end = Instant::now() + Duration::from_millis(500);
    let mut samples: Vec<u64> = Vec::with_capacity(1 << 20);
    let mut end = None;
    loop {
        let started = Instant::now();
        send_byte(fd)?;
        if !recv_byte(fd, mode.client_spins())? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed early",
            ));
        }
        let finished = Instant::now();
        match end {
            None if finished >= warmup_end => {
                end = Some(finished + Duration::from_secs_f64(args.seconds));
            }
            None => {}
            Some(end) if finished >= end => break,
            Some(_) => samples.push(finished.duration_since(started).as_nanos() as u64),
        }
    }
    drop(stream);
    server
        .join()
        .map_err(|_| io::Error::other("server thread panicked"))??;
    if samples.is_empty() {
        return Err(io::Error::other("no round trips measured"));
    }
    samples.sort_unstable();
    let quantile =
        |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Ok(Figures {
        round_trips: samples.len(),
        mean_us: samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0,
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
        min_us: samples[0] as f64 / 1000.0,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if !args.json {
        println!(
            "{:<12} {:>12} {:>10} {:>10} {:>10} {:>10}",
            "mode", "round trips", "mean us", "p50 us", "p99 us", "min us"
        );
    }
    for &mode in &args.modes {
        let figures = match run_mode(mode, &args) {
            Ok(figures) => figures,
            Err(error) => {
                eprintln!("tcp-pingpong: {}: {error}", mode.name());
                return ExitCode::from(1);
            }
        };
        if args.json {
            println!(
                "{{\"mode\":\"{}\",\"round_trips\":{},\"mean_us\":{:.2},\"p50_us\":{:.2},\"p99_us\":{:.2},\"min_us\":{:.2},\"server_cpu\":{},\"client_cpu\":{}}}",
                mode.name(),
                figures.round_trips,
                figures.mean_us,
                figures.p50_us,
                figures.p99_us,
                figures.min_us,
                args.server_cpu,
                args.client_cpu
            );
        } else {
            println!(
                "{:<12} {:>12} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                mode.name(),
                figures.round_trips,
                figures.mean_us,
                figures.p50_us,
                figures.p99_us,
                figures.min_us
            );
        }
    }
    ExitCode::SUCCESS
}
