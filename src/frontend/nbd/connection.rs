//! One NBD client connection: the socket side of the protocol.
//!
//! Owns: the non-blocking socket, the input buffer, the request slots (each with its reusable data
//! buffer), and the queue of replies waiting to be written. Requests are decoded and validated here and
//! handed to `SubmitIo`; completions come back through `complete` and are written out, many per `writev`.
//! Must never: block, allocate per request once its slots' buffers have grown to the client's request
//! sizes, hold more than `SLOTS_PER_CONNECTION` requests (reading stops until a slot frees: this is the
//! back-pressure that bounds a client's memory), or let one client's error affect another.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use crate::frontend::nbd::negotiation::{ExportInfo, Negotiation, NegotiationError, Step};
use crate::frontend::nbd::proto::{
    self, META_BASE_ALLOCATION_ID, NbdErrno, OPTION_HEADER_LEN, OPTION_LENGTH_MAX,
    REQUEST_HEADER_LEN, ReplyHeader,
};
use crate::frontend::nbd::request::{Decision, SessionLimits, ValidRequest, validate};
use crate::io::AlignedBuf;
use crate::metrics::Metrics;
use crate::volume::{
    EXTENT_RECORD_LEN, EXTENTS_PER_REPLY_MAX, IoCompletion, IoKind, IoRequest, Origin, SubmitIo,
    VolumeError, VolumeId,
};

/// Requests one connection may have between decoding and the end of its reply.
pub const SLOTS_PER_CONNECTION: usize = 64;
/// Slot buffers larger than this are freed after their reply, so that one large request does not pin
/// memory for the connection's lifetime.
const SLOT_BUFFER_KEEP_BYTES_MAX: usize = 1 << 20;
/// Input buffer: holds the largest option we accept in one piece, and many request headers.
const INPUT_BUFFER_LEN: usize = 128 * 1024;
const _: () = assert!(INPUT_BUFFER_LEN >= OPTION_HEADER_LEN + OPTION_LENGTH_MAX as usize);
/// Slices per `writev`.
const WRITE_SLICES_MAX: usize = 64;

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
pub enum CloseReason {
    #[error("client closed the connection")]
    PeerClosed,
    #[error("finished: client disconnected or server shutting down")]
    Finished,
    #[error("socket error: {0}")]
    Socket(#[from] io::Error),
    #[error("negotiation: {0}")]
    Negotiation(#[from] NegotiationError),
    #[error("protocol violation: {0}")]
    Protocol(#[from] proto::HeaderError),
    #[error("negotiation not finished in time")]
    NegotiationTimeout,
}

impl CloseReason {
    /// Whether this is the ordinary end of a session (logged quietly) rather than a fault.
    pub fn is_orderly(&self) -> bool {
        matches!(
            self,
            CloseReason::PeerClosed
                | CloseReason::Finished
                | CloseReason::Negotiation(NegotiationError::Aborted)
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Transmission {
    volume: VolumeId,
    limits: SessionLimits,
}

enum Phase {
    Negotiating(Negotiation),
    Transmitting(Transmission),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receive {
    Header,
    Payload { slot: u16, filled: u32 },
    Discard { remaining: u32 },
}

struct Slot {
    buf: AlignedBuf,
    request: ValidRequest,
    /// When the request was decoded (for the latency histogram).
    started: Instant,
}

struct Reply {
    header: ReplyHeader,
    slot: u16,
    data_len: u32,
}

impl Reply {
    fn len(&self) -> usize {
        usize::from(self.header.len) + self.data_len as usize
    }
}

struct InputBuffer {
    bytes: Box<[u8]>,
    start: usize,
    end: usize,
}

impl InputBuffer {
    fn available(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// Moves unconsumed bytes to the front when the tail is too short for what the parser waits for.
    fn make_room(&mut self, wanted: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.bytes.len() - self.start < wanted.max(REQUEST_HEADER_LEN)
            || self.end == self.bytes.len()
        {
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

pub struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    origin: Origin,
    phase: Phase,
    input: InputBuffer,
    /// Negotiation bytes waiting to be written (before any reply).
    control: Vec<u8>,
    control_sent: usize,
    replies: VecDeque<Reply>,
    /// Bytes of the front reply already written.
    reply_sent: usize,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    receive: Receive,
    in_flight: usize,
    /// The socket may hold unread bytes (set by readiness, cleared by a short or would-block read).
    read_ready: bool,
    /// Stop taking requests: the client sent NBD_CMD_DISC or the server is shutting down.
    draining: bool,
    /// The reactor's clock for the iteration now running `pump` (one clock read per iteration, not
    /// two per request: measured 4 % of the reactor's time at QD32 in clock_gettime).
    now: Instant,
    metrics: Arc<Metrics>,
}

impl Connection {
    /// A new connection; `origin` identifies it (reactor, index, generation) in the requests it submits.
    pub fn new(
        stream: TcpStream,
        peer: SocketAddr,
        origin: Origin,
        metrics: Arc<Metrics>,
    ) -> Connection {
        let mut control = Vec::with_capacity(256);
        let negotiation = Negotiation::start(&mut control);
        let started = Instant::now();
        let empty_request = ValidRequest {
            cookie: 0,
            kind: IoKind::Flush,
            flags: crate::volume::IoFlags::empty(),
            offset: 0,
            length: 0,
            payload: 0,
        };
        Connection {
            stream,
            peer,
            origin,
            phase: Phase::Negotiating(negotiation),
            input: InputBuffer {
                bytes: vec![0u8; INPUT_BUFFER_LEN].into_boxed_slice(),
                start: 0,
                end: 0,
            },
            control,
            control_sent: 0,
            replies: VecDeque::with_capacity(SLOTS_PER_CONNECTION),
            reply_sent: 0,
            slots: (0..SLOTS_PER_CONNECTION)
                .map(|_| Slot {
                    buf: AlignedBuf::empty(),
                    request: empty_request,
                    started,
                })
                .collect(),
            free_slots: (0..SLOTS_PER_CONNECTION as u16).rev().collect(),
            receive: Receive::Header,
            in_flight: 0,
            read_ready: true,
            draining: false,
            now: started,
            metrics,
        }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn is_negotiating(&self) -> bool {
        matches!(self.phase, Phase::Negotiating(_))
    }

    /// Requests submitted to a volume and not completed yet: the connection must outlive them only to
    /// send their replies; their buffers come back even if it does not.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Readiness from the poller.
    pub fn on_ready(&mut self, readable: bool) {
        self.read_ready |= readable;
    }

    /// Server shutdown: take no new requests, finish the ones in flight, then close.
    pub fn begin_drain(&mut self) {
        self.draining = true;
    }

    /// Writes what is pending, takes in what the socket holds, and says whether the connection lives on.
    /// `now`: the reactor's clock for this iteration, the start time of the requests taken in.
    pub fn pump(
        &mut self,
        exports: &[ExportInfo],
        submit: &mut dyn SubmitIo,
        now: Instant,
    ) -> Result<(), CloseReason> {
        self.now = now;
        self.flush()?;
        while !self.draining {
            self.receive(exports, submit)?;
            let stalled_on_slots = self.waiting_for_slot();
            self.flush()?;
            // Writing replies may have freed the slots that input was waiting for: take it in now, as
            // no new readiness event will come for bytes already buffered or already signalled.
            let input_waiting = self.read_ready || self.input.start < self.input.end;
            if !(stalled_on_slots && input_waiting && !self.free_slots.is_empty()) {
                break;
            }
        }
        if self.draining && self.is_quiet() {
            return Err(CloseReason::Finished);
        }
        Ok(())
    }

    /// Nothing in flight and nothing left to write.
    fn is_quiet(&self) -> bool {
        self.in_flight == 0 && self.replies.is_empty() && self.control_sent == self.control.len()
    }

    /// A volume finished a request of ours: queue its reply (written by the next `pump`).
    /// `now`: the reactor's clock for this iteration, the end time of the request.
    pub fn complete(&mut self, completion: IoCompletion, now: Instant) {
        debug_assert!(self.in_flight > 0);
        self.in_flight -= 1;
        let slot_index = completion.origin.slot;
        let (structured, volume) = match self.phase {
            Phase::Transmitting(transmission) => {
                (transmission.limits.structured_replies, transmission.volume)
            }
            Phase::Negotiating(_) => unreachable!("requests are only submitted in transmission"),
        };
        let slot = &mut self.slots[usize::from(slot_index)];
        slot.buf = completion.buf;
        let request = slot.request;
        self.metrics.volumes[volume as usize].finished(
            request.kind,
            request.length,
            completion.result.is_ok(),
            now.saturating_duration_since(slot.started).as_nanos() as u64,
        );
        let reply = match completion.result {
            Ok(result) => match request.kind {
                IoKind::Read => Reply {
                    header: if structured {
                        ReplyHeader::read_data(request.cookie, request.offset, request.length)
                    } else {
                        ReplyHeader::simple(request.cookie, 0)
                    },
                    slot: slot_index,
                    data_len: request.length,
                },
                IoKind::BlockStatus => {
                    let data_len = encode_extents(&mut slot.buf, result as usize, request.length);
                    Reply {
                        header: ReplyHeader::block_status(
                            request.cookie,
                            META_BASE_ALLOCATION_ID,
                            data_len,
                        ),
                        slot: slot_index,
                        data_len,
                    }
                }
                _ => Reply {
                    header: ReplyHeader::simple(request.cookie, 0),
                    slot: slot_index,
                    data_len: 0,
                },
            },
            Err(error) => {
                if !matches!(error, VolumeError::NotSupported) {
                    tracing::warn!(peer = %self.peer, ?request, %error, "IO failed");
                }
                error_reply(request.cookie, nbd_errno(error), structured, slot_index)
            }
        };
        self.replies.push_back(reply);
    }

    fn receive(
        &mut self,
        exports: &[ExportInfo],
        submit: &mut dyn SubmitIo,
    ) -> Result<(), CloseReason> {
        loop {
            self.consume_input(exports, submit)?;
            if self.draining || !self.read_ready || self.waiting_for_slot() {
                return Ok(());
            }
            let wanted = match &self.phase {
                Phase::Negotiating(negotiation) => negotiation.bytes_wanted(),
                Phase::Transmitting(_) => REQUEST_HEADER_LEN,
            };
            self.input.make_room(wanted);
            let spare = &mut self.input.bytes[self.input.end..];
            if spare.is_empty() {
                return Ok(());
            }
            let spare_len = spare.len();
            match self.stream.read(spare) {
                Ok(0) => return Err(CloseReason::PeerClosed),
                Ok(read) => {
                    self.input.end += read;
                    if read < spare_len {
                        // The socket is drained (a new arrival raises a new edge): no need for a read
                        // that would only say EAGAIN.
                        self.read_ready = false;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.read_ready = false,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn waiting_for_slot(&self) -> bool {
        matches!(self.phase, Phase::Transmitting(_))
            && self.receive == Receive::Header
            && self.free_slots.is_empty()
    }

    /// Decodes and acts on every complete message in the input buffer.
    fn consume_input(
        &mut self,
        exports: &[ExportInfo],
        submit: &mut dyn SubmitIo,
    ) -> Result<(), CloseReason> {
        loop {
            let transmission = match &mut self.phase {
                Phase::Negotiating(negotiation) => {
                    let input = &self.input.bytes[self.input.start..self.input.end];
                    let (used, step) = negotiation.feed(input, &mut self.control, exports);
                    self.input.start += used;
                    match step {
                        Step::NeedMore => return Ok(()),
                        Step::Transmission(agreement) => {
                            let export = &exports[agreement.export];
                            self.phase = Phase::Transmitting(Transmission {
                                volume: agreement.export as VolumeId,
                                limits: SessionLimits {
                                    export_size_bytes: export.size_bytes,
                                    structured_replies: agreement.structured_replies,
                                    base_allocation: agreement.base_allocation,
                                },
                            });
                            continue;
                        }
                        Step::Close(error) => {
                            // Best effort: the client may want the reply to its ABORT or the refusal.
                            let _ = self.flush();
                            return Err(error.into());
                        }
                    }
                }
                Phase::Transmitting(transmission) => *transmission,
            };
            let available = self.input.end - self.input.start;
            match self.receive {
                Receive::Header => {
                    if self.draining || available < REQUEST_HEADER_LEN {
                        return Ok(());
                    }
                    let Some(slot) = self.free_slots.pop() else {
                        return Ok(());
                    };
                    let bytes: &[u8; REQUEST_HEADER_LEN] = self.input.available()
                        [..REQUEST_HEADER_LEN]
                        .try_into()
                        .expect("header length");
                    let header = match proto::decode_request(bytes) {
                        Ok(header) => header,
                        Err(error) => {
                            self.free_slots.push(slot);
                            return Err(error.into());
                        }
                    };
                    self.input.start += REQUEST_HEADER_LEN;
                    match validate(&header, &transmission.limits) {
                        Decision::Execute(request) => {
                            self.slots[usize::from(slot)].request = request;
                            self.slots[usize::from(slot)].started = self.now;
                            if request.payload > 0 {
                                let buf = &mut self.slots[usize::from(slot)].buf;
                                buf.reserve_total(request.payload as usize);
                                buf.set_len(request.payload as usize);
                                self.receive = Receive::Payload { slot, filled: 0 };
                            } else {
                                self.submit(slot, transmission.volume, submit);
                            }
                        }
                        Decision::Reject {
                            cookie,
                            errno,
                            discard,
                            reason,
                        } => {
                            tracing::warn!(peer = %self.peer, ?header, ?errno, reason, "request refused");
                            let structured = transmission.limits.structured_replies;
                            self.replies
                                .push_back(error_reply(cookie, errno, structured, slot));
                            if discard > 0 {
                                self.receive = Receive::Discard { remaining: discard };
                            }
                        }
                        Decision::Disconnect => {
                            self.free_slots.push(slot);
                            self.draining = true;
                            return Ok(());
                        }
                    }
                }
                Receive::Payload { slot, filled } => {
                    let buf = &mut self.slots[usize::from(slot)].buf;
                    let wanted = buf.len() - filled as usize;
                    let take = wanted.min(available);
                    if take == 0 {
                        return Ok(());
                    }
                    let start = self.input.start;
                    buf.as_mut_slice()[filled as usize..filled as usize + take]
                        .copy_from_slice(&self.input.bytes[start..start + take]);
                    self.input.start += take;
                    if take == wanted {
                        self.receive = Receive::Header;
                        self.submit(slot, transmission.volume, submit);
                    } else {
                        self.receive = Receive::Payload {
                            slot,
                            filled: filled + take as u32,
                        };
                    }
                }
                Receive::Discard { remaining } => {
                    let take = (remaining as usize).min(available);
                    if take == 0 {
                        return Ok(());
                    }
                    self.input.start += take;
                    let remaining = remaining - take as u32;
                    self.receive = if remaining == 0 {
                        Receive::Header
                    } else {
                        Receive::Discard { remaining }
                    };
                }
            }
        }
    }

    fn submit(&mut self, slot_index: u16, volume: VolumeId, submit: &mut dyn SubmitIo) {
        let slot = &mut self.slots[usize::from(slot_index)];
        let request = slot.request;
        let mut buf = std::mem::replace(&mut slot.buf, AlignedBuf::empty());
        match request.kind {
            IoKind::Read => {
                buf.reserve_total(request.length as usize);
                buf.set_len(request.length as usize);
            }
            IoKind::BlockStatus => {
                buf.reserve_total(EXTENTS_PER_REPLY_MAX * EXTENT_RECORD_LEN);
                buf.set_len(0);
            }
            IoKind::Write => {}
            _ => buf.set_len(0),
        }
        self.in_flight += 1;
        self.metrics.volumes[volume as usize].started();
        submit.submit(IoRequest {
            volume,
            kind: request.kind,
            flags: request.flags,
            offset: request.offset,
            length: request.length,
            buf,
            origin: Origin {
                slot: slot_index,
                ..self.origin
            },
        });
    }

    /// Writes queued bytes until done or the socket is full.
    fn flush(&mut self) -> Result<(), CloseReason> {
        loop {
            let pending_control = &self.control[self.control_sent..];
            if pending_control.is_empty() && self.replies.is_empty() {
                self.control.clear();
                self.control_sent = 0;
                return Ok(());
            }
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES_MAX];
            let mut count = 0;
            if !pending_control.is_empty() {
                slices[0] = IoSlice::new(pending_control);
                count = 1;
            }
            let mut skip = self.reply_sent;
            for reply in &self.replies {
                if count + 2 > WRITE_SLICES_MAX {
                    break;
                }
                let header = reply.header.as_slice();
                if skip < header.len() {
                    slices[count] = IoSlice::new(&header[skip..]);
                    count += 1;
                    skip = 0;
                } else {
                    skip -= header.len();
                }
                if reply.data_len > 0 {
                    let data = &self.slots[usize::from(reply.slot)].buf.as_slice()
                        [..reply.data_len as usize];
                    slices[count] = IoSlice::new(&data[skip..]);
                    count += 1;
                }
                skip = 0;
            }
            match self.stream.write_vectored(&slices[..count]) {
                Ok(0) => return Err(CloseReason::PeerClosed),
                Ok(written) => self.advance(written),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Accounts for `written` bytes: control bytes first, then replies, freeing the slots of finished ones.
    fn advance(&mut self, mut written: usize) {
        let control_left = self.control.len() - self.control_sent;
        let from_control = control_left.min(written);
        self.control_sent += from_control;
        written -= from_control;
        while written > 0 {
            let front = self.replies.front().expect("wrote more than was queued");
            let left = front.len() - self.reply_sent;
            if written < left {
                self.reply_sent += written;
                return;
            }
            written -= left;
            self.reply_sent = 0;
            let slot = self.replies.pop_front().expect("front exists").slot;
            let buf = &mut self.slots[usize::from(slot)].buf;
            if buf.capacity() > SLOT_BUFFER_KEEP_BYTES_MAX {
                buf.release();
            }
            self.free_slots.push(slot);
        }
    }
}

fn error_reply(cookie: u64, errno: NbdErrno, structured: bool, slot: u16) -> Reply {
    let header = if structured {
        ReplyHeader::structured_error(cookie, errno as u32)
    } else {
        ReplyHeader::simple(cookie, errno as u32)
    };
    Reply {
        header,
        slot,
        data_len: 0,
    }
}

fn nbd_errno(error: VolumeError) -> NbdErrno {
    match error {
        // A fenced note's outcome is unknown, as for an interrupted write: EIO.
        VolumeError::Io(_) | VolumeError::Fenced => NbdErrno::Io,
        VolumeError::NoSpace => NbdErrno::NoSpc,
        VolumeError::NotSupported => NbdErrno::NotSup,
        VolumeError::Invalid => NbdErrno::Inval,
    }
}

/// Rewrites `count` native extent records into NBD block descriptors (big-endian length and flags), never
/// covering more than `length_max` bytes in total. Returns the descriptor bytes.
fn encode_extents(buf: &mut AlignedBuf, count: usize, length_max: u32) -> u32 {
    let mut covered = 0u64;
    let mut kept = 0usize;
    for record in
        buf.as_mut_slice()[..count * EXTENT_RECORD_LEN].chunks_exact_mut(EXTENT_RECORD_LEN)
    {
        let length = u32::from_ne_bytes(record[0..4].try_into().expect("4 bytes"));
        let flags = u32::from_ne_bytes(record[4..8].try_into().expect("4 bytes"));
        let length = u64::from(length).min(u64::from(length_max) - covered) as u32;
        if length == 0 {
            break;
        }
        covered += u64::from(length);
        record[0..4].copy_from_slice(&length.to_be_bytes());
        record[4..8].copy_from_slice(&flags.to_be_bytes());
        kept += 1;
    }
    debug_assert!(kept > 0, "a block status answer has at least one extent");
    (kept * EXTENT_RECORD_LEN) as u32
}
