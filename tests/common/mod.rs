//! Shared helpers for the ferroblock integration tests: a server launcher,
//! external-tool checks, temp dirs, a deterministic PRNG, and a minimal raw
//! NBD client (fixed newstyle) built on `std::net::TcpStream` only.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Upper bound for anything that "should be quick" (server start-up, a reply).
pub const DEADLINE: Duration = Duration::from_secs(30);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

// ---------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::SeqCst),
        nanos
    )
}

/// A directory under `std::env::temp_dir()` removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("ferroblock-test-{tag}-{}", unique_suffix()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Server launcher
// ---------------------------------------------------------------------------

pub fn ferroblock_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferroblock")
}

/// A running `ferroblock serve` child process. Killed on drop.
pub struct Server {
    child: Option<Child>,
    pub pid: i32,
    /// Full URI as printed by the server, e.g. `nbd://127.0.0.1:40000/vol0`.
    pub uri: String,
    /// `host:port` part of the URI.
    pub addr: String,
    /// Export name (path part of the URI, without the leading slash).
    pub export: String,
    /// Server stderr is redirected here (kept for debugging).
    pub stderr_path: PathBuf,
    _dir: TempDir,
}

/// Why `Server::try_start` failed.
#[derive(Debug)]
pub struct StartFailure {
    pub msg: String,
    /// Exit status, if the process exited by itself.
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

/// `ferroblock serve <args>` must refuse to start: exit code 1 and a message naming `file` and
/// containing `needle`.
pub fn refused_at_start(args: &[&str], file: &str, needle: &str) {
    let failure = match Server::try_start(args) {
        Ok(_) => panic!("serve {args:?} must be refused"),
        Err(failure) => failure,
    };
    assert_eq!(
        failure.status.and_then(|status| status.code()),
        Some(1),
        "{failure:?}"
    );
    assert!(
        failure.stderr.contains(file) && failure.stderr.contains(needle),
        "expected {file:?} and {needle:?} in:\n{}",
        failure.stderr
    );
}

/// Parse `nbd://HOST:PORT/NAME` into (`HOST:PORT`, `NAME`).
pub fn parse_uri(uri: &str) -> (String, String) {
    let rest = uri
        .strip_prefix("nbd://")
        .unwrap_or_else(|| panic!("URI {uri:?} does not start with nbd://"));
    let (addr, export) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    (addr.to_string(), export.to_string())
}

impl Server {
    /// Runs `ferroblock serve --listen 127.0.0.1:0 <args>` and waits (bounded)
    /// for its `ferroblock: serving nbd://...` line on stdout. Panics (with the
    /// server's stderr) if it does not start.
    pub fn start(args: &[&str]) -> Server {
        // Sparse stores: dozens of tests at once must not reserve a GiB of disk each.
        let mut full = vec!["serve", "--listen", "127.0.0.1:0", "--sparse"];
        full.extend_from_slice(args);
        Server::start_raw(&full)
    }

    /// Like `start` but the caller supplies every argument (including `serve`).
    pub fn start_raw(args: &[&str]) -> Server {
        Server::try_start_raw(args).unwrap_or_else(|f| {
            panic!(
                "ferroblock {args:?} did not start: {}; exit status {:?}; stderr:\n{}",
                f.msg, f.status, f.stderr
            )
        })
    }

    /// Like `start`, but returns how the server failed instead of panicking.
    pub fn try_start(args: &[&str]) -> Result<Server, StartFailure> {
        let mut full = vec!["serve", "--listen", "127.0.0.1:0", "--sparse"];
        full.extend_from_slice(args);
        Server::try_start_raw(&full)
    }

    pub fn try_start_raw(args: &[&str]) -> Result<Server, StartFailure> {
        Server::try_start_wrapped(&[], args)
    }

    /// Like `try_start_raw`, with the server run under `wrapper` (e.g. `["prlimit", "--fsize=N"]`).
    pub fn try_start_wrapped(wrapper: &[&str], args: &[&str]) -> Result<Server, StartFailure> {
        let dir = TempDir::new("server");
        let stderr_path = dir.join("stderr.log");
        let stderr_file = File::create(&stderr_path).expect("create stderr log");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(ferroblock_bin());
                command
            }
            None => Command::new(ferroblock_bin()),
        };
        // The server runs in its own temp dir, so that its default data dir is private to the test.
        let mut child = command
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_file))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} {args:?}: {e}", ferroblock_bin()));
        let pid = child.id() as i32;
        let stdout = child.stdout.take().expect("child stdout");

        // Read stdout lines on a thread so the wait is bounded; the thread keeps
        // draining stdout afterwards so the server never sees EPIPE.
        let (tx, rx) = mpsc::channel::<Result<String, String>>();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let mut seen = Vec::new();
            let mut sent = false;
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => {
                        if !sent {
                            let _ = tx.send(Err(format!(
                                "server stdout closed before the URI line; stdout was: {seen:?}"
                            )));
                        }
                        return;
                    }
                    Ok(_) => {
                        if !sent {
                            let l = line.trim_end().to_string();
                            if l.starts_with("ferroblock: serving ") {
                                let uri = l.split_whitespace().last().unwrap_or("").to_string();
                                let _ = tx.send(Ok(uri));
                                sent = true;
                            } else {
                                seen.push(l);
                            }
                        }
                    }
                    Err(e) => {
                        if !sent {
                            let _ = tx.send(Err(format!("reading server stdout: {e}")));
                        }
                        return;
                    }
                }
            }
        });

        let uri = match rx.recv_timeout(DEADLINE) {
            Ok(Ok(uri)) => uri,
            Ok(Err(msg)) => {
                // stdout closed: the process is exiting; collect its status.
                let status = wait_child(&mut child, DEADLINE);
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(StartFailure {
                    msg,
                    status,
                    stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                });
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartFailure {
                    msg: format!("no URI line within {DEADLINE:?}"),
                    status: None,
                    stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                });
            }
        };
        let (addr, export) = parse_uri(&uri);
        Ok(Server {
            child: Some(child),
            pid,
            uri,
            addr,
            export,
            stderr_path,
            _dir: dir,
        })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Connects a raw client and completes GO on the server's export.
    pub fn client(&self) -> NbdConn {
        NbdConn::connect_go(&self.addr, &self.export, false)
    }

    /// Same, with structured replies (and `base:allocation`) negotiated.
    pub fn client_structured(&self) -> NbdConn {
        NbdConn::connect_go(&self.addr, &self.export, true)
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid);
    }

    /// Waits (bounded) for the server to exit and returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server already reaped");
        match wait_child(child, deadline) {
            Some(st) => {
                self.child = None;
                st
            }
            None => panic!(
                "server (pid {}) did not exit within {deadline:?}; stderr:\n{}",
                self.pid,
                self.stderr()
            ),
        }
    }

    /// True if the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Panics (with stderr) if the server process has died.
    pub fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait().expect("try_wait") {
                panic!("server died: {st:?}; stderr:\n{}", self.stderr());
            }
        } else {
            panic!("server was already reaped");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            // Show the server's log next to the failing assertion.
            let log = self.stderr();
            let tail: Vec<&str> = log.lines().rev().take(50).collect();
            eprintln!(
                "--- ferroblock stderr ({}), last {} lines ---",
                self.uri,
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `try_wait` until the child exits or the deadline passes.
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion with a bounded wait; returns its output.
/// On timeout the child is killed and the test panics.
pub fn run_bounded(cmd: &mut Command, deadline: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_child(&mut child, deadline) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = t_out.join().unwrap();
            let stderr = t_err.join().unwrap();
            panic!(
                "{desc} did not finish within {deadline:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Formats a command's output for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------

fn package_for(tool: &str) -> &'static str {
    match tool {
        "fio" => "fio",
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdcopy" | "nbdinfo" | "nbdsh" | "nbdfuse" => "libnbd-bin",
        "nbdkit" => "nbdkit",
        "sha256sum" => "coreutils",
        "/usr/bin/python3" => "python3 and python3-libnbd",
        _ => "(unknown package)",
    }
}

/// Panics (never skips) if `name` is not an executable on PATH (or, for an
/// absolute path, does not exist).
pub fn require_tool(name: &str) {
    let found = if name.contains('/') {
        Path::new(name).is_file()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
            .unwrap_or(false)
    };
    assert!(
        found,
        "required external tool `{name}` was not found; install the Debian package `{}` \
         (e.g. `apt-get install {}`)",
        package_for(name),
        package_for(name)
    );
}

/// Panics unless Debian's python3-libnbd is importable by /usr/bin/python3.
pub fn require_python_libnbd() {
    require_tool("/usr/bin/python3");
    let out = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .expect("running /usr/bin/python3");
    assert!(
        out.status.success(),
        "`/usr/bin/python3 -c 'import nbd'` failed; install the Debian package \
         `python3-libnbd`:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// sha256 of a file via `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    require_tool("sha256sum");
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    assert!(out.status.success(), "sha256sum failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

// ---------------------------------------------------------------------------
// Deterministic pseudo-random data
// ---------------------------------------------------------------------------

/// xorshift64* generator: deterministic, good enough for test payloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Writes `len` bytes of seeded random data to `path`.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut f = File::create(path).expect("create random file");
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    f.sync_all().ok();
}

// ---------------------------------------------------------------------------
// Raw NBD client
// ---------------------------------------------------------------------------

pub mod nbd {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    // handshake flags
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
    pub const FLAG_C_NO_ZEROES: u32 = 2;

    // options
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    // option reply types
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
    pub const REP_ERR_POLICY: u32 = 0x8000_0002;
    pub const REP_ERR_INVALID: u32 = 0x8000_0003;
    pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
    pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
    pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
    pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
    pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
    pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

    // info types
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // transmission flags
    pub const TF_HAS_FLAGS: u16 = 1 << 0;
    pub const TF_READ_ONLY: u16 = 1 << 1;
    pub const TF_SEND_FLUSH: u16 = 1 << 2;
    pub const TF_SEND_FUA: u16 = 1 << 3;
    pub const TF_ROTATIONAL: u16 = 1 << 4;
    pub const TF_SEND_TRIM: u16 = 1 << 5;
    pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TF_SEND_DF: u16 = 1 << 7;
    pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
    pub const TF_SEND_RESIZE: u16 = 1 << 9;
    pub const TF_SEND_CACHE: u16 = 1 << 10;
    pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

    // commands
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    // command flags
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_DF: u16 = 1 << 2;
    pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
    pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

    // structured reply
    pub const REPLY_FLAG_DONE: u16 = 1;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERROR: u16 = 0x8001;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

    // block status flags (base:allocation)
    pub const STATE_HOLE: u32 = 1;
    pub const STATE_ZERO: u32 = 2;

    // errno values used on the wire
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    pub const MAX_REQUEST: u32 = 33_554_432;
}

/// One option reply as sent by the server.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub rtype: u32,
    pub data: Vec<u8>,
}

/// What GO/INFO returned on success.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub tflags: u16,
    /// (minimum, preferred, maximum) if the server sent NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
}

/// Result of one transmission-phase request.
#[derive(Debug, Clone, Default)]
pub struct CmdReply {
    /// 0 for success, else the NBD error (errno) value.
    pub error: u32,
    /// True if the reply (or its error) used a structured reply.
    pub structured: bool,
    /// Type of the structured error chunk, if the error came as one.
    pub error_chunk: Option<u16>,
    /// Read data (READ only).
    pub data: Vec<u8>,
    /// Block status descriptors: (context id, length, flags).
    pub extents: Vec<(u32, u32, u32)>,
    /// Number of structured chunks received.
    pub chunks: usize,
    /// Number of content chunks (OFFSET_DATA / OFFSET_HOLE) in a READ reply.
    pub content_chunks: usize,
}

pub struct NbdConn {
    pub stream: TcpStream,
    pub handshake_flags: u16,
    pub structured: bool,
    /// Meta context id negotiated for base:allocation, if any.
    pub meta_id: Option<u32>,
    pub info: ExportInfo,
    next_handle: u64,
}

/// Connects with a bounded retry loop (the listener is ready once the URI line
/// was printed, but be tolerant anyway).
pub fn tcp_connect(addr: &str) -> TcpStream {
    let end = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                s.set_write_timeout(Some(DEADLINE)).unwrap();
                s.set_nodelay(true).ok();
                return s;
            }
            Err(e) => {
                if Instant::now() >= end {
                    panic!("connecting to {addr}: {e}");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Outcome of waiting for the server to drop a connection.
#[derive(Debug)]
pub enum Closed {
    /// EOF or ECONNRESET (optionally after some bytes the server sent first).
    Yes { bytes_before: usize },
    /// The read timed out: the server kept the connection open.
    TimedOut { bytes_before: usize },
}

/// Reads until EOF / reset / timeout; used to assert "server disconnects".
pub fn wait_closed(stream: &mut TcpStream, timeout: Duration) -> Closed {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut total = 0usize;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                return Closed::Yes {
                    bytes_before: total,
                };
            }
            Ok(n) => total += n,
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return Closed::TimedOut {
                        bytes_before: total,
                    };
                }
                io::ErrorKind::Interrupted => continue,
                _ => {
                    return Closed::Yes {
                        bytes_before: total,
                    };
                }
            },
        }
    }
}

/// Panics unless the server closes `stream` within 10 s.
pub fn assert_disconnected(stream: &mut TcpStream, what: &str) {
    match wait_closed(stream, Duration::from_secs(10)) {
        Closed::Yes { .. } => {}
        Closed::TimedOut { bytes_before } => panic!(
            "{what}: expected the server to disconnect, but the connection stayed open \
             (received {bytes_before} bytes, then nothing for 10 s)"
        ),
    }
}

impl NbdConn {
    /// TCP connect, read the greeting, send client flags (FIXED_NEWSTYLE|NO_ZEROES).
    pub fn connect(addr: &str) -> NbdConn {
        let mut stream = tcp_connect(addr);
        let hflags = read_greeting(&mut stream).expect("reading server greeting");
        assert!(
            hflags & nbd::FLAG_FIXED_NEWSTYLE != 0,
            "server did not advertise FIXED_NEWSTYLE (handshake flags {hflags:#x})"
        );
        let mut cflags = nbd::FLAG_C_FIXED_NEWSTYLE;
        if hflags & nbd::FLAG_NO_ZEROES != 0 {
            cflags |= nbd::FLAG_C_NO_ZEROES;
        }
        stream
            .write_all(&cflags.to_be_bytes())
            .expect("sending client flags");
        NbdConn {
            stream,
            handshake_flags: hflags,
            structured: false,
            meta_id: None,
            info: ExportInfo::default(),
            next_handle: 1,
        }
    }

    /// Connect and GO; with `structured` also negotiates STRUCTURED_REPLY and
    /// sets the `base:allocation` meta context first.
    pub fn connect_go(addr: &str, export: &str, structured: bool) -> NbdConn {
        let mut c = NbdConn::connect(addr);
        if structured {
            let r = c.opt_structured_reply().expect("STRUCTURED_REPLY");
            assert_eq!(r, nbd::REP_ACK, "STRUCTURED_REPLY not acked: {r:#x}");
            let ctx = c
                .opt_meta_context(nbd::OPT_SET_META_CONTEXT, export, &["base:allocation"])
                .expect("SET_META_CONTEXT")
                .unwrap_or_else(|e| panic!("SET_META_CONTEXT failed with {e:#x}"));
            assert_eq!(ctx.len(), 1, "expected exactly one meta context: {ctx:?}");
            assert_eq!(ctx[0].1, "base:allocation");
            c.meta_id = Some(ctx[0].0);
        }
        let info = c
            .opt_go(export, &[nbd::INFO_BLOCK_SIZE])
            .expect("GO")
            .unwrap_or_else(|e| panic!("GO {export:?} failed with reply type {e:#x}"));
        c.info = info;
        c
    }

    // -- option haggling ----------------------------------------------------

    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&opt.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.stream.write_all(&msg)
    }

    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let mut hdr = [0u8; 20];
        self.stream.read_exact(&mut hdr)?;
        let magic = be64(&hdr[0..8]);
        if magic != nbd::OPT_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option reply magic {magic:#x}"),
            ));
        }
        let option = be32(&hdr[8..12]);
        let rtype = be32(&hdr[12..16]);
        let len = be32(&hdr[16..20]) as usize;
        if len > 16 * 1024 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option reply length {len} absurd"),
            ));
        }
        let mut data = vec![0u8; len];
        self.stream.read_exact(&mut data)?;
        Ok(OptReply {
            option,
            rtype,
            data,
        })
    }

    /// Sends an option and reads a single reply (for options with one reply).
    pub fn option_simple(&mut self, opt: u32, data: &[u8]) -> io::Result<OptReply> {
        self.send_option(opt, data)?;
        let r = self.read_option_reply()?;
        assert_eq!(
            r.option, opt,
            "option reply for {} came back tagged with option {}",
            opt, r.option
        );
        Ok(r)
    }

    pub fn opt_structured_reply(&mut self) -> io::Result<u32> {
        let r = self.option_simple(nbd::OPT_STRUCTURED_REPLY, &[])?;
        if r.rtype == nbd::REP_ACK {
            self.structured = true;
        }
        Ok(r.rtype)
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// GO (or INFO with `opt == OPT_INFO`). Ok(Err(reply_type)) on an error reply.
    pub fn opt_info_or_go(
        &mut self,
        opt: u32,
        name: &str,
        infos: &[u16],
    ) -> io::Result<Result<ExportInfo, u32>> {
        let payload = Self::go_payload(name, infos);
        self.send_option(opt, &payload)?;
        let mut info = ExportInfo::default();
        let mut got_export = false;
        loop {
            let r = self.read_option_reply()?;
            assert_eq!(r.option, opt, "reply to option {opt} tagged {}", r.option);
            match r.rtype {
                nbd::REP_ACK => {
                    assert!(got_export, "GO/INFO acked without NBD_INFO_EXPORT");
                    return Ok(Ok(info));
                }
                nbd::REP_INFO => {
                    assert!(r.data.len() >= 2, "short NBD_REP_INFO");
                    match be16(&r.data) {
                        nbd::INFO_EXPORT => {
                            assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                            info.size = be64(&r.data[2..10]);
                            info.tflags = be16(&r.data[10..12]);
                            got_export = true;
                        }
                        nbd::INFO_BLOCK_SIZE => {
                            assert_eq!(r.data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
                            info.block_size = Some((
                                be32(&r.data[2..6]),
                                be32(&r.data[6..10]),
                                be32(&r.data[10..14]),
                            ));
                        }
                        nbd::INFO_NAME => {
                            info.name = Some(String::from_utf8_lossy(&r.data[2..]).into_owned());
                        }
                        _ => {}
                    }
                }
                t if t & 0x8000_0000 != 0 => return Ok(Err(t)),
                t => panic!("unexpected reply type {t:#x} to GO/INFO"),
            }
        }
    }

    pub fn opt_go(&mut self, name: &str, infos: &[u16]) -> io::Result<Result<ExportInfo, u32>> {
        let r = self.opt_info_or_go(nbd::OPT_GO, name, infos)?;
        if let Ok(info) = &r {
            self.info = info.clone();
        }
        Ok(r)
    }

    /// LIST: Ok(Ok(names)) or Ok(Err(reply_type)).
    pub fn opt_list(&mut self) -> io::Result<Result<Vec<String>, u32>> {
        self.send_option(nbd::OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let r = self.read_option_reply()?;
            match r.rtype {
                nbd::REP_ACK => return Ok(Ok(names)),
                nbd::REP_SERVER => {
                    assert!(r.data.len() >= 4, "short NBD_REP_SERVER");
                    let n = be32(&r.data) as usize;
                    assert!(4 + n <= r.data.len(), "bad NBD_REP_SERVER name length");
                    names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
                }
                t if t & 0x8000_0000 != 0 => return Ok(Err(t)),
                t => panic!("unexpected reply type {t:#x} to LIST"),
            }
        }
    }

    /// LIST_META_CONTEXT / SET_META_CONTEXT. Ok(Ok([(id, name)])) or Ok(Err(type)).
    pub fn opt_meta_context(
        &mut self,
        opt: u32,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Vec<(u32, String)>, u32>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send_option(opt, &d)?;
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply()?;
            assert_eq!(r.option, opt);
            match r.rtype {
                nbd::REP_ACK => return Ok(Ok(out)),
                nbd::REP_META_CONTEXT => {
                    assert!(r.data.len() >= 4, "short NBD_REP_META_CONTEXT");
                    out.push((
                        be32(&r.data),
                        String::from_utf8_lossy(&r.data[4..]).into_owned(),
                    ));
                }
                t if t & 0x8000_0000 != 0 => return Ok(Err(t)),
                t => panic!("unexpected reply type {t:#x} to meta context option"),
            }
        }
    }

    /// EXPORT_NAME: returns (size, transmission flags) on success.
    pub fn opt_export_name(&mut self, name: &str) -> io::Result<(u64, u16)> {
        self.send_option(nbd::OPT_EXPORT_NAME, name.as_bytes())?;
        let mut buf = [0u8; 10];
        self.stream.read_exact(&mut buf)?;
        if self.handshake_flags & nbd::FLAG_NO_ZEROES == 0 {
            let mut z = [0u8; 124];
            self.stream.read_exact(&mut z)?;
        }
        let size = be64(&buf[0..8]);
        let tflags = be16(&buf[8..10]);
        self.info.size = size;
        self.info.tflags = tflags;
        Ok((size, tflags))
    }

    // -- transmission --------------------------------------------------------

    pub fn request_bytes(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&nbd::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&cmd.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    pub fn alloc_handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        h.wrapping_mul(0x0101_0101_0101_0101) ^ 0xfe00_0000_0000_0000
    }

    pub fn send_request(
        &mut self,
        flags: u16,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let hdr = Self::request_bytes(flags, cmd, handle, offset, len);
        if payload.len() <= 64 * 1024 {
            let mut v = Vec::with_capacity(28 + payload.len());
            v.extend_from_slice(&hdr);
            v.extend_from_slice(payload);
            self.stream.write_all(&v)
        } else {
            self.stream.write_all(&hdr)?;
            self.stream.write_all(payload)
        }
    }

    /// Reads the complete reply for `handle`. `read_len` is the number of data
    /// bytes a successful simple READ reply carries (0 for other commands).
    pub fn read_reply(&mut self, handle: u64, read_len: usize) -> io::Result<CmdReply> {
        let mut reply = CmdReply::default();
        loop {
            let mut m = [0u8; 4];
            self.stream.read_exact(&mut m)?;
            let magic = be32(&m);
            if magic == nbd::SIMPLE_REPLY_MAGIC {
                let mut rest = [0u8; 12];
                self.stream.read_exact(&mut rest)?;
                let error = be32(&rest[0..4]);
                let h = be64(&rest[4..12]);
                if h != handle {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("simple reply for handle {h:#x}, expected {handle:#x}"),
                    ));
                }
                if reply.chunks > 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "simple reply after structured chunks for the same handle",
                    ));
                }
                reply.error = error;
                if error == 0 && read_len > 0 {
                    if self.structured {
                        // unreachable for READ: command() routes structured
                        // READs to read_structured_read.
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "simple reply carrying READ data after structured replies \
                             were negotiated",
                        ));
                    }
                    let mut data = vec![0u8; read_len];
                    self.stream.read_exact(&mut data)?;
                    reply.data = data;
                }
                return Ok(reply);
            } else if magic == nbd::STRUCTURED_REPLY_MAGIC {
                if !self.structured {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "structured reply without STRUCTURED_REPLY negotiated",
                    ));
                }
                let mut rest = [0u8; 16];
                self.stream.read_exact(&mut rest)?;
                let flags = be16(&rest[0..2]);
                let rtype = be16(&rest[2..4]);
                let h = be64(&rest[4..12]);
                let len = be32(&rest[12..16]) as usize;
                if h != handle {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("structured reply for handle {h:#x}, expected {handle:#x}"),
                    ));
                }
                if len > 64 * 1024 * 1024 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("structured chunk length {len} absurd"),
                    ));
                }
                let mut payload = vec![0u8; len];
                self.stream.read_exact(&mut payload)?;
                reply.structured = true;
                reply.chunks += 1;
                match rtype {
                    nbd::REPLY_TYPE_NONE => {}
                    nbd::REPLY_TYPE_OFFSET_DATA | nbd::REPLY_TYPE_OFFSET_HOLE => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "content chunk in the reply to a non-READ command",
                        ));
                    }
                    nbd::REPLY_TYPE_BLOCK_STATUS => {
                        let id = be32(&payload[0..4]);
                        for d in payload[4..].chunks(8) {
                            reply.extents.push((id, be32(&d[0..4]), be32(&d[4..8])));
                        }
                    }
                    t if t & 0x8000 != 0 => {
                        reply.error = be32(&payload[0..4]);
                        reply.error_chunk = Some(t);
                    }
                    t => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unknown structured reply type {t:#x}"),
                        ));
                    }
                }
                if flags & nbd::REPLY_FLAG_DONE != 0 {
                    return Ok(reply);
                }
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply magic {magic:#x}"),
                ));
            }
        }
    }

    /// Sends one request and reads its reply. READ data is returned relative to
    /// the request offset.
    pub fn command(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<CmdReply> {
        let handle = self.alloc_handle();
        self.send_request(flags, cmd, handle, offset, len, payload)?;
        let read_len = if cmd == nbd::CMD_READ {
            len as usize
        } else {
            0
        };
        // Structured READ chunks carry absolute offsets: rebase them.
        let mut r = if self.structured && cmd == nbd::CMD_READ {
            self.read_structured_read(handle, offset, read_len)?
        } else {
            self.read_reply(handle, read_len)?
        };
        if cmd == nbd::CMD_READ && r.error == 0 && r.data.len() != read_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("READ returned {} bytes, wanted {read_len}", r.data.len()),
            ));
        }
        if cmd != nbd::CMD_READ {
            r.data.clear();
        }
        Ok(r)
    }

    fn read_structured_read(
        &mut self,
        handle: u64,
        req_offset: u64,
        len: usize,
    ) -> io::Result<CmdReply> {
        let mut reply = CmdReply::default();
        let mut buf = vec![0u8; len];
        let mut covered = 0usize;
        loop {
            let mut m = [0u8; 4];
            self.stream.read_exact(&mut m)?;
            let magic = be32(&m);
            if magic == nbd::SIMPLE_REPLY_MAGIC {
                let mut rest = [0u8; 12];
                self.stream.read_exact(&mut rest)?;
                let error = be32(&rest[0..4]);
                let h = be64(&rest[4..12]);
                if h != handle {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "handle mismatch",
                    ));
                }
                if error == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "successful simple reply to READ with structured replies negotiated",
                    ));
                }
                reply.error = error;
                return Ok(reply);
            }
            if magic != nbd::STRUCTURED_REPLY_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad reply magic {magic:#x}"),
                ));
            }
            let mut rest = [0u8; 16];
            self.stream.read_exact(&mut rest)?;
            let flags = be16(&rest[0..2]);
            let rtype = be16(&rest[2..4]);
            let h = be64(&rest[4..12]);
            let clen = be32(&rest[12..16]) as usize;
            if h != handle {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "handle mismatch",
                ));
            }
            if clen > 64 * 1024 * 1024 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk too long"));
            }
            let mut payload = vec![0u8; clen];
            self.stream.read_exact(&mut payload)?;
            reply.structured = true;
            reply.chunks += 1;
            match rtype {
                nbd::REPLY_TYPE_NONE => {}
                nbd::REPLY_TYPE_OFFSET_DATA | nbd::REPLY_TYPE_OFFSET_HOLE => {
                    let abs = be64(&payload[0..8]);
                    let n = if rtype == nbd::REPLY_TYPE_OFFSET_DATA {
                        clen - 8
                    } else {
                        be32(&payload[8..12]) as usize
                    };
                    if abs < req_offset || (abs - req_offset) as usize + n > len {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("content chunk [{abs}, +{n}) outside request"),
                        ));
                    }
                    let rel = (abs - req_offset) as usize;
                    if rtype == nbd::REPLY_TYPE_OFFSET_DATA {
                        buf[rel..rel + n].copy_from_slice(&payload[8..]);
                    } else {
                        buf[rel..rel + n].fill(0);
                    }
                    covered += n;
                    reply.content_chunks += 1;
                }
                t if t & 0x8000 != 0 => {
                    reply.error = be32(&payload[0..4]);
                    reply.error_chunk = Some(t);
                }
                t => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected chunk type {t:#x} in READ reply"),
                    ));
                }
            }
            if flags & nbd::REPLY_FLAG_DONE != 0 {
                if reply.error == 0 {
                    if covered != len {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("READ chunks covered {covered} of {len} bytes"),
                        ));
                    }
                    reply.data = buf;
                }
                return Ok(reply);
            }
        }
    }

    // -- convenience wrappers (panic on I/O errors) --------------------------

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let r = self
            .command(0, nbd::CMD_READ, offset, len, &[])
            .unwrap_or_else(|e| panic!("READ {offset}+{len}: {e}"));
        if r.error != 0 {
            Err(r.error)
        } else {
            Ok(r.data)
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.command(flags, nbd::CMD_WRITE, offset, data.len() as u32, data)
            .unwrap_or_else(|e| panic!("WRITE {offset}+{}: {e}", data.len()))
            .error
    }

    pub fn simple_cmd(&mut self, flags: u16, cmd: u16, offset: u64, len: u32) -> u32 {
        self.command(flags, cmd, offset, len, &[])
            .unwrap_or_else(|e| panic!("command {cmd} {offset}+{len}: {e}"))
            .error
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> u32 {
        self.simple_cmd(0, nbd::CMD_TRIM, offset, len)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, flags: u16) -> u32 {
        self.simple_cmd(flags, nbd::CMD_WRITE_ZEROES, offset, len)
    }

    pub fn flush(&mut self) -> u32 {
        self.simple_cmd(0, nbd::CMD_FLUSH, 0, 0)
    }

    pub fn cache(&mut self, offset: u64, len: u32) -> u32 {
        self.simple_cmd(0, nbd::CMD_CACHE, offset, len)
    }

    pub fn block_status(&mut self, offset: u64, len: u32, flags: u16) -> CmdReply {
        self.command(flags, nbd::CMD_BLOCK_STATUS, offset, len, &[])
            .unwrap_or_else(|e| panic!("BLOCK_STATUS {offset}+{len}: {e}"))
    }

    /// Write `data` at `offset`, read it back, and assert equality.
    #[track_caller]
    pub fn write_verify(&mut self, offset: u64, data: &[u8]) {
        let e = self.write(offset, data, 0);
        assert_eq!(e, 0, "WRITE at {offset} failed with errno {e}");
        let back = self
            .read(offset, data.len() as u32)
            .unwrap_or_else(|e| panic!("READ at {offset} failed with errno {e}"));
        assert_bytes(&back, data, &format!("data read back at {offset}"));
    }

    /// Sends NBD_CMD_DISC and waits for the server to close the socket.
    pub fn disconnect(mut self) {
        let h = self.alloc_handle();
        let _ = self.send_request(0, nbd::CMD_DISC, h, 0, 0, &[]);
        let _ = self.stream.shutdown(Shutdown::Write);
        let _ = wait_closed(&mut self.stream, Duration::from_secs(10));
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one reply message: a simple reply header (never followed by data
    /// here, so only use it in structured mode or for non-READ commands) or
    /// one structured chunk.
    pub fn read_message(&mut self) -> io::Result<Message> {
        let mut m = [0u8; 4];
        self.stream.read_exact(&mut m)?;
        match be32(&m) {
            nbd::SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.stream.read_exact(&mut rest)?;
                Ok(Message::Simple {
                    error: be32(&rest[0..4]),
                    handle: be64(&rest[4..12]),
                })
            }
            nbd::STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                self.stream.read_exact(&mut rest)?;
                let len = be32(&rest[12..16]) as usize;
                if len > 64 * 1024 * 1024 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk too long"));
                }
                let mut payload = vec![0u8; len];
                self.stream.read_exact(&mut payload)?;
                Ok(Message::Chunk {
                    flags: be16(&rest[0..2]),
                    rtype: be16(&rest[2..4]),
                    handle: be64(&rest[4..12]),
                    payload,
                })
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply magic {other:#x}"),
            )),
        }
    }
}

/// One reply message as read by `NbdConn::read_message`.
#[derive(Debug)]
pub enum Message {
    Simple {
        handle: u64,
        error: u32,
    },
    Chunk {
        handle: u64,
        flags: u16,
        rtype: u16,
        payload: Vec<u8>,
    },
}

pub fn be16_at(b: &[u8]) -> u16 {
    be16(b)
}
pub fn be32_at(b: &[u8]) -> u32 {
    be32(b)
}
pub fn be64_at(b: &[u8]) -> u64 {
    be64(b)
}

/// Reads NBDMAGIC + IHAVEOPT + handshake flags; returns the flags.
pub fn read_greeting(stream: &mut TcpStream) -> io::Result<u16> {
    let mut g = [0u8; 18];
    stream.read_exact(&mut g)?;
    let m1 = be64(&g[0..8]);
    let m2 = be64(&g[8..16]);
    if m1 != nbd::NBDMAGIC || m2 != nbd::IHAVEOPT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad greeting magics {m1:#x} {m2:#x}"),
        ));
    }
    Ok(be16(&g[16..18]))
}

/// A fresh, well-behaved client: GO, write a random 4 KiB block at `offset`,
/// read it back, flush, disconnect. Panics on any deviation.
pub fn assert_healthy(addr: &str, export: &str, offset: u64, seed: u64) {
    for structured in [false, true] {
        let mut c = NbdConn::connect_go(addr, export, structured);
        let data = Rng::new(seed ^ structured as u64).bytes(4096);
        c.write_verify(offset, &data);
        assert_eq!(c.flush(), 0, "FLUSH failed");
        c.disconnect();
    }
}

/// Asserts byte equality, reporting the first difference instead of dumping
/// whole buffers.
#[track_caller]
pub fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Asserts that every byte is zero.
#[track_caller]
pub fn assert_zeros(got: &[u8], what: &str) {
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!(
            "{what}: byte {i} of {} is {:#04x}, want zero",
            got.len(),
            got[i]
        );
    }
}

/// Runs `qemu-io -f raw -c C1 -c C2 ... URI`, asserts that it succeeded and that no pattern check
/// failed, and returns its stdout.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    require_tool("qemu-io");
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for step in commands {
        command.args(["-c", step]);
    }
    command.arg(uri);
    let out = run_bounded(&mut command, DEADLINE);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {commands:?}: {}",
        describe(&out)
    );
    text
}
