//! One benchmark connection to an NBD server: fixed-newstyle handshake ending in `NBD_OPT_GO` (simple
//! replies only), then up to `queue_depth` requests in flight, each timed from submission (or, under a
//! rate limit, from the moment it was due) to the parse of its reply.
//!
//! Owns: the socket of one connection and its in-flight table. Must never: share state with other
//! connections except the progress counters and the interval channel; allocate per request (buffers
//! are sized once from the workload's limits).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::ops::OpPicker;
use super::slots::{InFlight, LoopTime, wait_ready, wait_until_due};
use super::verify;
use super::workload::{PollMode, Workload, WorkloadError};
use super::{BenchError, IntervalHistogram, IntervalRecorder, Progress, RunClock};
use crate::frontend::nbd::proto::{
    self, ClientFlags, CommandFlags, HandshakeFlags, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC,
    REQUEST_HEADER_LEN, RequestHeader, SIMPLE_REPLY_MAGIC, TransmissionFlags, be_u16, be_u32,
    be_u64,
};

/// Wire values of the commands we send (proto decodes commands but has no encoder for them).
const COMMAND_READ_WIRE: u16 = 0;
const COMMAND_WRITE_WIRE: u16 = 1;
const COMMAND_DISCONNECT_WIRE: u16 = 2;
/// A simple reply header: magic, error, cookie.
const SIMPLE_REPLY_LEN: usize = 16;
/// An option reply header: magic, option, type, length.
const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Largest option reply we read during the handshake.
const OPTION_REPLY_LENGTH_MAX: usize = 1 << 20;
/// A connection that makes no progress for this long with requests in flight has failed.
const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Blocking receives (the handshake, interrupt-mode waits) give up after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer floor; it also holds at least two full read replies.
const RECEIVE_BUFFER_BYTES_MIN: usize = 1 << 20;
/// Error replies and verify failures printed per connection (the rest are only counted).
pub const ERROR_REPORTS_MAX: u64 = 10;

/// What one connection did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionTotals {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    /// Error replies from an NBD server, or failed or short reads and writes of a file.
    pub errors_io: u64,
    /// Sectors that failed `--verify` (one per failed read).
    pub errors_verify: u64,
    /// Wall time of measured loop iterations that found nothing to do (an empty socket or ring) ...
    pub idle_nanos: u64,
    /// ... and of those that moved data: the split shows how much of a busy-polling client's CPU was
    /// spent on work rather than spinning.
    pub busy_nanos: u64,
}

/// An established connection, negotiated and ready to run.
pub struct Connection {
    stream: TcpStream,
    pub export_bytes: u64,
    pub read_only: bool,
}

fn protocol_error(message: String) -> BenchError {
    BenchError::Protocol(message)
}

/// Connects and negotiates `export` with `NBD_OPT_GO`.
pub fn connect(address: &str, export: &str) -> Result<Connection, BenchError> {
    let context = |error: io::Error| BenchError::Connect {
        address: address.to_owned(),
        error,
    };
    let mut stream = TcpStream::connect(address).map_err(context)?;
    stream.set_nodelay(true).map_err(context)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(context)?;
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).map_err(context)?;
    if be_u64(&greeting[0..8]) != NBDMAGIC || be_u64(&greeting[8..16]) != IHAVEOPT {
        return Err(protocol_error(
            "not a newstyle NBD server (bad greeting magic)".into(),
        ));
    }
    let server_flags = HandshakeFlags::from_bits_retain(be_u16(&greeting[16..18]));
    if !server_flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
        return Err(protocol_error(
            "server does not speak fixed newstyle".into(),
        ));
    }
    let mut client_flags = ClientFlags::FIXED_NEWSTYLE;
    if server_flags.contains(HandshakeFlags::NO_ZEROES) {
        client_flags |= ClientFlags::NO_ZEROES;
    }
    let export_len = u32::try_from(export.len())
        .ok()
        .filter(|&len| len as usize <= proto::STRING_LENGTH_MAX)
        .ok_or_else(|| protocol_error("export name too long".into()))?;
    let mut option = Vec::with_capacity(32 + export.len());
    option.extend_from_slice(&client_flags.bits().to_be_bytes());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&proto::opt::GO.to_be_bytes());
    // Name length, name, and zero information requests.
    option.extend_from_slice(&(export_len + 4 + 2).to_be_bytes());
    option.extend_from_slice(&export_len.to_be_bytes());
    option.extend_from_slice(export.as_bytes());
    option.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&option).map_err(context)?;

    let mut export_info = None;
    loop {
        let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
        stream.read_exact(&mut header).map_err(context)?;
        if be_u64(&header[0..8]) != OPTION_REPLY_MAGIC {
            return Err(protocol_error("bad option reply magic".into()));
        }
        let reply_type = be_u32(&header[12..16]);
        let length = be_u32(&header[16..20]) as usize;
        if length > OPTION_REPLY_LENGTH_MAX {
            return Err(protocol_error(format!("option reply of {length} bytes")));
        }
        let mut data = vec![0u8; length];
        stream.read_exact(&mut data).map_err(context)?;
        match reply_type {
            proto::rep::ACK => break,
            proto::rep::INFO if data.len() >= 12 && be_u16(&data[0..2]) == proto::info::EXPORT => {
                let flags = TransmissionFlags::from_bits_retain(be_u16(&data[10..12]));
                export_info = Some((be_u64(&data[2..10]), flags));
            }
            proto::rep::INFO => {}
            error if error & (1 << 31) != 0 => {
                return Err(protocol_error(format!(
                    "NBD_OPT_GO for export {export:?} refused ({error:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            other => {
                return Err(protocol_error(format!(
                    "unexpected option reply type {other}"
                )));
            }
        }
    }
    let (export_bytes, flags) = export_info
        .ok_or_else(|| protocol_error("NBD_OPT_GO finished without NBD_INFO_EXPORT".into()))?;
    // The socket stays blocking (with HANDSHAKE_TIMEOUT as its receive timeout, so a silent server cannot
    // hang a blocking receive): busy polling passes MSG_DONTWAIT on every call instead.
    Ok(Connection {
        stream,
        export_bytes,
        read_only: flags.contains(TransmissionFlags::READ_ONLY),
    })
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

/// Receives what is there (`block == false`), or waits for something (`block == true`, bounded by the
/// socket's receive timeout).
fn receive_some(fd: i32, buffer: &mut [u8], block: bool) -> io::Result<Option<usize>> {
    let flags = if block { 0 } else { libc::MSG_DONTWAIT };
    // SAFETY: the pointer and length describe a live, writable slice that recv fills at most.
    let result = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), flags) };
    syscall_result(result)
}

impl ConnectionTotals {
    /// A read whose data failed `--verify`: counted, and reported for the first few.
    pub(crate) fn verify_failed(&mut self, failure: &impl std::fmt::Display, request: &InFlight) {
        self.errors_verify += 1;
        if self.errors_verify <= ERROR_REPORTS_MAX {
            eprintln!(
                "ferroblock bench: {failure} (in a {}-byte read at offset {})",
                request.length, request.offset
            );
        }
    }
}

/// Runs the workload's share for connection `index` on an established connection.
pub fn run(
    connection: Connection,
    workload: &Workload,
    index: usize,
    clock: &RunClock,
    progress: &Progress,
    intervals: &Sender<IntervalHistogram>,
) -> Result<ConnectionTotals, BenchError> {
    if connection.read_only && workload.read_percent < 100 {
        return Err(BenchError::Workload(WorkloadError::ReadOnlyExport));
    }
    let region = workload
        .region(index, connection.export_bytes)
        .map_err(BenchError::Workload)?;
    let stream = connection.stream;
    let fd = stream.as_raw_fd();
    let block_size_max = workload.block_sizes.size_max_bytes() as usize;
    let queue_depth = workload.queue_depth;

    let Some(start) = clock.wait_for_start() else {
        return Ok(ConnectionTotals::default());
    };
    let mut picker = OpPicker::new(workload, index, region, start);
    // Without --verify every write carries the same random payload.
    let payload: Vec<u8> = if workload.verify {
        Vec::new()
    } else {
        (0..block_size_max).map(|_| picker.payload_byte()).collect()
    };

    let mut slots = vec![InFlight::idle(start); queue_depth];
    let mut free: Vec<usize> = (0..queue_depth).rev().collect();
    let mut out: Vec<u8> = Vec::with_capacity(queue_depth * (REQUEST_HEADER_LEN + block_size_max));
    let mut out_position = 0usize;
    let input_capacity = (2 * (SIMPLE_REPLY_LEN + block_size_max)).max(RECEIVE_BUFFER_BYTES_MIN);
    let mut input = vec![0u8; input_capacity];
    let (mut input_start, mut input_end) = (0usize, 0usize);
    let mut in_flight = 0usize;
    let mut recorder = IntervalRecorder::new(intervals)?;
    let mut totals = ConnectionTotals::default();
    let mut last_progress = start;
    let measure_from = start + workload.ramp;
    // An iteration works when it moves bytes.
    let mut time = LoopTime::new(start, measure_from);

    loop {
        let now = Instant::now();
        time.next_iteration(now, &mut totals);
        let stopping = picker.is_done(now);
        // Queue new requests while slots are free (and, under a rate limit, while they are due).
        while !free.is_empty() {
            let overlaps =
                |offset: u64, length: u32| slots.iter().any(|slot| slot.overlaps(offset, length));
            let Some(op) = picker.pick(now, overlaps) else {
                break;
            };
            let Some(slot_index) = free.pop() else {
                break;
            };
            let header = RequestHeader {
                flags: CommandFlags::empty(),
                command: if op.is_write {
                    proto::Command::Write
                } else {
                    proto::Command::Read
                },
                cookie: slot_index as u64,
                offset: op.offset,
                length: op.length,
            };
            let command_wire = if op.is_write {
                COMMAND_WRITE_WIRE
            } else {
                COMMAND_READ_WIRE
            };
            out.extend_from_slice(&proto::encode_request(&header, command_wire));
            if op.is_write {
                let payload_start = out.len();
                if workload.verify {
                    out.resize(payload_start + op.length as usize, 0);
                    verify::stamp(&mut out[payload_start..], op.offset, op.write_seed);
                } else {
                    out.extend_from_slice(&payload[..op.length as usize]);
                }
            }
            slots[slot_index] = InFlight::issued(&op);
            in_flight += 1;
        }

        if out_position < out.len() {
            if let Some(sent) = send_some(fd, &out[out_position..]).map_err(BenchError::Io)? {
                out_position += sent;
                if sent > 0 {
                    time.worked();
                }
            }
            if out_position == out.len() {
                out.clear();
                out_position = 0;
            }
        }
        if in_flight == 0 {
            if stopping {
                break;
            }
            wait_until_due(&picker, workload.poll, STALL_LIMIT);
            last_progress = Instant::now();
            continue;
        }
        if input_start == input_end {
            input_start = 0;
            input_end = 0;
        } else if input_capacity - input_end < SIMPLE_REPLY_LEN + block_size_max {
            input.copy_within(input_start..input_end, 0);
            input_end -= input_start;
            input_start = 0;
        }
        // Interrupt mode with everything sent and nothing due: block in recv, one syscall per wake-up.
        let block = workload.poll == PollMode::Interrupt
            && out.is_empty()
            && (stopping || free.is_empty() || picker.next_due().is_none());
        match receive_some(fd, &mut input[input_end..], block).map_err(BenchError::Io)? {
            Some(0) => {
                return Err(BenchError::Protocol(format!(
                    "server closed the connection with {in_flight} requests in flight"
                )));
            }
            Some(received) => {
                input_end += received;
                time.worked();
            }
            None => {}
        }
        let mut completed_ops = 0u64;
        let mut completed_bytes = 0u64;
        if input_end - input_start >= SIMPLE_REPLY_LEN {
            let done_at = Instant::now();
            while input_end - input_start >= SIMPLE_REPLY_LEN {
                let header = &input[input_start..input_start + SIMPLE_REPLY_LEN];
                let magic = be_u32(&header[0..4]);
                if magic != SIMPLE_REPLY_MAGIC {
                    return Err(BenchError::Protocol(format!("bad reply magic {magic:#x}")));
                }
                let error = be_u32(&header[4..8]);
                let cookie = be_u64(&header[8..16]);
                let slot_index = usize::try_from(cookie)
                    .ok()
                    .filter(|&slot_index| slot_index < slots.len() && slots[slot_index].busy)
                    .ok_or_else(|| {
                        BenchError::Protocol(format!("reply for unknown cookie {cookie}"))
                    })?;
                let slot = slots[slot_index];
                let data_len = if slot.is_write || error != 0 {
                    0
                } else {
                    slot.length as usize
                };
                let total_len = SIMPLE_REPLY_LEN + data_len;
                if input_end - input_start < total_len {
                    break;
                }
                let data = &input[input_start + SIMPLE_REPLY_LEN..input_start + total_len];
                if error != 0 {
                    totals.errors_io += 1;
                    if totals.errors_io <= ERROR_REPORTS_MAX {
                        eprintln!(
                            "ferroblock bench: NBD error {error} for a {}-byte {} at offset {}",
                            slot.length,
                            if slot.is_write { "write" } else { "read" },
                            slot.offset
                        );
                    }
                } else if workload.verify
                    && !slot.is_write
                    && let Err(failure) = verify::check(data, slot.offset)
                {
                    totals.verify_failed(&failure, &slot);
                }
                input_start += total_len;
                slots[slot_index].busy = false;
                free.push(slot_index);
                in_flight -= 1;
                completed_ops += 1;
                completed_bytes += u64::from(slot.length);
                slot.count_finished(&mut totals, &mut recorder, clock, done_at);
            }
        }
        if completed_ops > 0 {
            progress.ops.fetch_add(completed_ops, Ordering::Relaxed);
            progress.bytes.fetch_add(completed_bytes, Ordering::Relaxed);
        }
        if time.has_worked() {
            last_progress = now;
            continue;
        }
        if now.duration_since(last_progress) > STALL_LIMIT {
            return Err(BenchError::Protocol(format!(
                "no progress for {STALL_LIMIT:?} with {in_flight} requests in flight"
            )));
        }
        if workload.poll == PollMode::Interrupt && !block {
            let events = if out.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLIN | libc::POLLOUT
            };
            let mut timeout = STALL_LIMIT;
            if let Some(due) = picker.next_due()
                && !stopping
                && !free.is_empty()
            {
                timeout = timeout.min(due.saturating_duration_since(Instant::now()));
            }
            wait_ready(fd, events, timeout).map_err(BenchError::Io)?;
        }
    }
    recorder.finish();
    // Polite goodbye: NBD_CMD_DISC, then close.
    let disconnect = RequestHeader {
        flags: CommandFlags::empty(),
        command: proto::Command::Disconnect,
        cookie: 0,
        offset: 0,
        length: 0,
    };
    let mut stream = stream;
    let _ = stream.set_nonblocking(false);
    let _ = stream.write_all(&proto::encode_request(&disconnect, COMMAND_DISCONNECT_WIRE));
    Ok(totals)
}
