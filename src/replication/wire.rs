//! The replication wire format: one `message::Message` per frame, each frame stamped with the volume, the
//! sender's epoch and a checksum.
//!
//! Owns: the frame layout, the encoding of every message kind, and `FrameDecoder`, the bounded parser that
//! turns the bytes of an (already authenticated, see `auth`) connection into validated `Frame`s.
//! Must never: touch a socket or a clock, trust a length from the peer before checking it against a named
//! limit, hand out a frame whose checksum or contents failed a check, or go on decoding after a refusal
//! (the connection must be closed: we cannot resynchronise on a byte stream). Whether a frame's epoch is
//! stale is the peer state machine's decision, not ours.
//!
//! # Frame layout
//! Every integer is little-endian. A frame is a 32-byte header followed by `payload length` bytes.
//!
//! | offset | size | field          | notes                                                          |
//! |-------:|-----:|----------------|----------------------------------------------------------------|
//! |      0 |    4 | magic          | `b"FBRP"`                                                      |
//! |      4 |    1 | version        | `PROTOCOL_VERSION` (= 1); any other value is refused           |
//! |      5 |    1 | kind           | `FrameKind`: 1 Hello .. 7 Stale                                |
//! |      6 |    2 | flags          | `FrameFlags`; unknown bits, or bits not valid for the kind, are refused |
//! |      8 |    8 | volume         | `VolumeId`: first 8 bytes of sha256(volume name)               |
//! |     16 |    8 | epoch          | the sender's epoch                                             |
//! |     24 |    4 | payload length | bounded per kind (`max_payload_len`)                           |
//! |     28 |    4 | crc32c         | over the header with this field zeroed, then the payload       |
//!
//! Payloads, by kind:
//!
//! | kind              | payload                                                                            |
//! |-------------------|------------------------------------------------------------------------------------|
//! | 1 Hello           | node length u8 (1..=64), node (UTF-8), base u64, range count u32 (≤ `REPAIR_RANGES_MAX`), count × (offset u64, length u64); `rejoin` is the `REJOIN` flag |
//! | 2 CatchUpExtent   | note (below); kind `Write` or `Zero`                                               |
//! | 3 CatchUpDone     | through u64                                                                        |
//! | 4 Note            | note (below)                                                                       |
//! | 5 Heartbeat       | sent_at u64, committed u64                                                         |
//! | 6 Ack             | committed u64, echo u64                                                            |
//! | 7 Stale           | epoch u64                                                                          |
//!
//! A note is op u64, note kind u8 (1 Write, 2 Trim, 3 Zero), offset u64, length u64 (`NOTE_HEADER_LEN`
//! = 25 bytes), then the data: exactly `length` bytes (≤ `NOTE_DATA_MAX`) for a `Write`, none otherwise.
//! Lengths are never zero and `offset + length` never overflows, for notes and repair ranges alike.
//!
//! Every valid frame has exactly one encoding, so decoding then re-encoding gives back the same bytes.

use bitflags::bitflags;
use sha2::{Digest, Sha256};

use super::message::{ByteRange, Message, NoteKind, NoteMessage};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FBRP";
/// The only protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 32;
/// Largest node name, in bytes of UTF-8 (shared with the handshake in `auth`).
pub const NODE_NAME_MAX: usize = 64;
/// Most repair ranges one `Hello` may carry (bounds the Hello payload to 64 KiB and change).
pub const REPAIR_RANGES_MAX: usize = 4096;
/// Largest data of one `Write` note or catch-up extent: the largest NBD write (`REQUEST_LENGTH_MAX`,
/// 32 MiB), because one host write is one note (an op number names one whole write).
pub const NOTE_DATA_MAX: usize = 32 * 1024 * 1024;
/// Size of a note before its data: op, kind, offset, length.
pub const NOTE_HEADER_LEN: usize = 8 + 1 + 8 + 8;
/// Largest frame of any kind, header included.
pub const FRAME_LEN_MAX: usize = HEADER_LEN + NOTE_HEADER_LEN + NOTE_DATA_MAX;

const HELLO_FIXED_LEN: usize = 1 + 8 + 4;
const RANGE_LEN: usize = 16;
const CRC_OFFSET: usize = 28;

/// The volume a frame is about: a stable 64-bit digest of the volume's name, the same on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub u64);

impl VolumeId {
    /// The first 8 bytes of sha256(`name`), read little-endian: the volume field of a frame holds exactly
    /// those bytes.
    pub fn from_name(name: &str) -> VolumeId {
        let digest = Sha256::digest(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        VolumeId(u64::from_le_bytes(first))
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The kind byte of a frame: which `Message` variant the payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    CatchUpExtent = 2,
    CatchUpDone = 3,
    Note = 4,
    Heartbeat = 5,
    Ack = 6,
    Stale = 7,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Hello,
            2 => FrameKind::CatchUpExtent,
            3 => FrameKind::CatchUpDone,
            4 => FrameKind::Note,
            5 => FrameKind::Heartbeat,
            6 => FrameKind::Ack,
            7 => FrameKind::Stale,
            _ => return None,
        })
    }

    pub fn of(message: &Message) -> FrameKind {
        match message {
            Message::Hello { .. } => FrameKind::Hello,
            Message::CatchUpExtent(_) => FrameKind::CatchUpExtent,
            Message::CatchUpDone { .. } => FrameKind::CatchUpDone,
            Message::Note(_) => FrameKind::Note,
            Message::Heartbeat { .. } => FrameKind::Heartbeat,
            Message::Ack { .. } => FrameKind::Ack,
            Message::Stale { .. } => FrameKind::Stale,
        }
    }

    /// The flags a frame of this kind may carry; anything else is refused.
    pub fn allowed_flags(self) -> FrameFlags {
        match self {
            FrameKind::Hello => FrameFlags::REJOIN,
            _ => FrameFlags::empty(),
        }
    }

    /// Bound on the payload length, checked before a byte of the payload is buffered.
    pub fn max_payload_len(self) -> usize {
        match self {
            FrameKind::Hello => HELLO_FIXED_LEN + NODE_NAME_MAX + REPAIR_RANGES_MAX * RANGE_LEN,
            FrameKind::CatchUpExtent | FrameKind::Note => NOTE_HEADER_LEN + NOTE_DATA_MAX,
            FrameKind::CatchUpDone | FrameKind::Stale => 8,
            FrameKind::Heartbeat | FrameKind::Ack => 16,
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

bitflags! {
    /// Per-frame flags. Bits 1.. are reserved for later versions (e.g. compressed payload,
    /// last-in-batch); this version refuses them, as it could not honour them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct FrameFlags: u16 {
        /// `Hello.rejoin`: the sender's notes after `base` are void.
        const REJOIN = 1 << 0;
    }
}

fn note_kind_byte(kind: NoteKind) -> u8 {
    match kind {
        NoteKind::Write => 1,
        NoteKind::Trim => 2,
        NoteKind::Zero => 3,
    }
}

fn note_kind_from_byte(byte: u8) -> Option<NoteKind> {
    match byte {
        1 => Some(NoteKind::Write),
        2 => Some(NoteKind::Trim),
        3 => Some(NoteKind::Zero),
        _ => None,
    }
}

/// One decoded frame: the message and the stamp it travelled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub volume: VolumeId,
    pub epoch: u64,
    pub message: Message,
}

/// Why a stream of frames was refused. After any of these the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "bad frame magic {found:02x?} (expected {MAGIC:02x?}): not a ferroblock replication stream"
    )]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("unknown frame kind {found}")]
    UnknownKind { found: u8 },
    #[error("unknown frame flags {bits:#06x}")]
    UnknownFlags { bits: u16 },
    #[error("flags {bits:#06x} are not valid on a {kind} frame")]
    FlagsNotAllowed { kind: FrameKind, bits: u16 },
    #[error("{kind} payload of {length} bytes exceeds the limit of {max}")]
    PayloadTooLong {
        kind: FrameKind,
        length: u32,
        max: usize,
    },
    #[error("checksum mismatch: frame says {expected:#010x}, content gives {computed:#010x}")]
    BadChecksum { expected: u32, computed: u32 },
    #[error("{kind} payload of {length} bytes is too short for its contents")]
    ShortPayload { kind: FrameKind, length: usize },
    #[error("{kind} payload has {extra} trailing bytes after its contents")]
    TrailingBytes { kind: FrameKind, extra: usize },
    #[error("node name of {length} bytes (must be 1..={NODE_NAME_MAX})")]
    NodeNameLength { length: usize },
    #[error("node name is not UTF-8")]
    NodeNameNotUtf8,
    #[error("{count} repair ranges (at most {REPAIR_RANGES_MAX})")]
    TooManyRepairRanges { count: u32 },
    #[error("unknown note kind {found}")]
    UnknownNoteKind { found: u8 },
    #[error("write of {length} bytes carries {data} bytes of data")]
    WriteDataLength { length: u64, data: usize },
    #[error("{kind:?} note carries {data} bytes of data (only writes carry data)")]
    DataOnNonWrite { kind: NoteKind, data: usize },
    #[error("catch-up extent of kind {kind:?} (only Write or Zero)")]
    CatchUpKind { kind: NoteKind },
    #[error("zero-length {what} at offset {offset}")]
    ZeroLength { what: &'static str, offset: u64 },
    #[error("{what} at offset {offset} of {length} bytes overflows the address space")]
    RangeOverflow {
        what: &'static str,
        offset: u64,
        length: u64,
    },
    #[error("the stream was already refused; the connection must be closed")]
    Poisoned,
}

/// Checks what the decoder checks on a message's contents (not the framing). `encode` asserts it, so
/// that we never send what the peer would refuse; callers holding unvetted input (a node name from the
/// configuration, a write from a host) can check it first.
pub fn validate(message: &Message) -> Result<(), WireError> {
    match message {
        Message::Hello { node, repair, .. } => {
            check_node_name_len(node.len())?;
            if repair.len() > REPAIR_RANGES_MAX {
                return Err(WireError::TooManyRepairRanges {
                    count: u32::try_from(repair.len()).unwrap_or(u32::MAX),
                });
            }
            for range in repair {
                check_range("repair range", range.offset, range.length)?;
            }
            Ok(())
        }
        Message::CatchUpExtent(note) => {
            if note.kind == NoteKind::Trim {
                return Err(WireError::CatchUpKind { kind: note.kind });
            }
            validate_note(FrameKind::CatchUpExtent, note)
        }
        Message::Note(note) => validate_note(FrameKind::Note, note),
        Message::CatchUpDone { .. }
        | Message::Heartbeat { .. }
        | Message::Ack { .. }
        | Message::Stale { .. } => Ok(()),
    }
}

fn check_node_name_len(length: usize) -> Result<(), WireError> {
    if length == 0 || length > NODE_NAME_MAX {
        return Err(WireError::NodeNameLength { length });
    }
    Ok(())
}

fn check_range(what: &'static str, offset: u64, length: u64) -> Result<(), WireError> {
    if length == 0 {
        return Err(WireError::ZeroLength { what, offset });
    }
    if offset.checked_add(length).is_none() {
        return Err(WireError::RangeOverflow {
            what,
            offset,
            length,
        });
    }
    Ok(())
}

fn validate_note(frame_kind: FrameKind, note: &NoteMessage) -> Result<(), WireError> {
    check_range("note", note.offset, note.length)?;
    match note.kind {
        NoteKind::Write => {
            // Compare as u64 so that a huge `length` cannot be truncated into a match.
            if note.data.len() as u64 != note.length {
                return Err(WireError::WriteDataLength {
                    length: note.length,
                    data: note.data.len(),
                });
            }
            if note.data.len() > NOTE_DATA_MAX {
                return Err(WireError::PayloadTooLong {
                    kind: frame_kind,
                    length: u32::try_from(NOTE_HEADER_LEN + note.data.len()).unwrap_or(u32::MAX),
                    max: NOTE_HEADER_LEN + NOTE_DATA_MAX,
                });
            }
        }
        NoteKind::Trim | NoteKind::Zero => {
            if !note.data.is_empty() {
                return Err(WireError::DataOnNonWrite {
                    kind: note.kind,
                    data: note.data.len(),
                });
            }
        }
    }
    Ok(())
}

/// Length of the payload `message` encodes to.
pub fn payload_len(message: &Message) -> usize {
    match message {
        Message::Hello { node, repair, .. } => {
            HELLO_FIXED_LEN + node.len() + repair.len() * RANGE_LEN
        }
        Message::CatchUpExtent(note) | Message::Note(note) => NOTE_HEADER_LEN + note.data.len(),
        Message::CatchUpDone { .. } | Message::Stale { .. } => 8,
        Message::Heartbeat { .. } | Message::Ack { .. } => 16,
    }
}

/// Appends one frame holding `message` to `out`, growing it at most once.
///
/// # Panics
/// If `message` fails `validate`: sending it would only get the connection refused by the peer, and it
/// means a bug on our side (a caller must split writes larger than `NOTE_DATA_MAX`).
pub fn encode(volume: VolumeId, epoch: u64, message: &Message, out: &mut Vec<u8>) {
    if let Err(error) = validate(message) {
        panic!("refusing to encode an invalid replication message: {error}");
    }
    let kind = FrameKind::of(message);
    let payload_len = payload_len(message);
    debug_assert!(payload_len <= kind.max_payload_len());
    let flags = match message {
        Message::Hello { rejoin: true, .. } => FrameFlags::REJOIN,
        _ => FrameFlags::empty(),
    };
    let start = out.len();
    out.reserve(HEADER_LEN + payload_len);
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&flags.bits().to_le_bytes());
    out.extend_from_slice(&volume.0.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    // Fits: validate bounded every part, and the largest payload is far below 4 GiB.
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    match message {
        Message::Hello {
            node,
            base,
            rejoin: _,
            repair,
        } => {
            out.push(node.len() as u8);
            out.extend_from_slice(node.as_bytes());
            out.extend_from_slice(&base.to_le_bytes());
            out.extend_from_slice(&(repair.len() as u32).to_le_bytes());
            for range in repair {
                out.extend_from_slice(&range.offset.to_le_bytes());
                out.extend_from_slice(&range.length.to_le_bytes());
            }
        }
        Message::CatchUpExtent(note) | Message::Note(note) => {
            out.extend_from_slice(&note.op.to_le_bytes());
            out.push(note_kind_byte(note.kind));
            out.extend_from_slice(&note.offset.to_le_bytes());
            out.extend_from_slice(&note.length.to_le_bytes());
            out.extend_from_slice(&note.data);
        }
        Message::CatchUpDone { through } => out.extend_from_slice(&through.to_le_bytes()),
        Message::Heartbeat { sent_at, committed } => {
            out.extend_from_slice(&sent_at.to_le_bytes());
            out.extend_from_slice(&committed.to_le_bytes());
        }
        Message::Ack { committed, echo } => {
            out.extend_from_slice(&committed.to_le_bytes());
            out.extend_from_slice(&echo.to_le_bytes());
        }
        Message::Stale { epoch } => out.extend_from_slice(&epoch.to_le_bytes()),
    }
    debug_assert_eq!(out.len() - start, HEADER_LEN + payload_len);
    let crc = crc32c::crc32c(&out[start..]);
    out[start + CRC_OFFSET..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// A header that passed every check that needs no payload.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: FrameKind,
    flags: FrameFlags,
    volume: VolumeId,
    epoch: u64,
    payload_len: usize,
    crc: u32,
}

fn le_u16(bytes: &[u8]) -> u16 {
    let mut array = [0; 2];
    array.copy_from_slice(bytes);
    u16::from_le_bytes(array)
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut array = [0; 4];
    array.copy_from_slice(bytes);
    u32::from_le_bytes(array)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut array = [0; 8];
    array.copy_from_slice(bytes);
    u64::from_le_bytes(array)
}

fn parse_header(header: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let mut magic = [0; 4];
    magic.copy_from_slice(&header[0..4]);
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    if header[4] != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { found: header[4] });
    }
    let kind =
        FrameKind::from_byte(header[5]).ok_or(WireError::UnknownKind { found: header[5] })?;
    let bits = le_u16(&header[6..8]);
    let flags = FrameFlags::from_bits(bits).ok_or(WireError::UnknownFlags { bits })?;
    if !kind.allowed_flags().contains(flags) {
        return Err(WireError::FlagsNotAllowed { kind, bits });
    }
    let length = le_u32(&header[24..28]);
    let max = kind.max_payload_len();
    // Refused before buffering: a peer cannot make us hold more than `max` bytes for one frame.
    if length as usize > max {
        return Err(WireError::PayloadTooLong { kind, length, max });
    }
    Ok(Header {
        kind,
        flags,
        volume: VolumeId(le_u64(&header[8..16])),
        epoch: le_u64(&header[16..24]),
        payload_len: length as usize,
        crc: le_u32(&header[CRC_OFFSET..HEADER_LEN]),
    })
}

/// Reads a payload front to back; every read is bounds-checked.
struct Reader<'a> {
    kind: FrameKind,
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], WireError> {
        let short = WireError::ShortPayload {
            kind: self.kind,
            length: self.bytes.len(),
        };
        let end = self.position.checked_add(count).ok_or(short.clone())?;
        let taken = self.bytes.get(self.position..end).ok_or(short)?;
        self.position = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(le_u32(self.take(4)?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(le_u64(self.take(8)?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.position..];
        self.position = self.bytes.len();
        rest
    }

    fn finish(&self) -> Result<(), WireError> {
        let extra = self.bytes.len() - self.position;
        if extra != 0 {
            return Err(WireError::TrailingBytes {
                kind: self.kind,
                extra,
            });
        }
        Ok(())
    }
}

fn parse_note(reader: &mut Reader<'_>) -> Result<NoteMessage, WireError> {
    // The whole note header first, so that a short payload is reported as such.
    let head = reader.take(NOTE_HEADER_LEN)?;
    let op = le_u64(&head[0..8]);
    let kind_byte = head[8];
    let kind =
        note_kind_from_byte(kind_byte).ok_or(WireError::UnknownNoteKind { found: kind_byte })?;
    let offset = le_u64(&head[9..17]);
    let length = le_u64(&head[17..25]);
    let data = reader.rest();
    // Check before copying the data out.
    check_range("note", offset, length)?;
    match kind {
        NoteKind::Write if data.len() as u64 != length => {
            return Err(WireError::WriteDataLength {
                length,
                data: data.len(),
            });
        }
        NoteKind::Trim | NoteKind::Zero if !data.is_empty() => {
            return Err(WireError::DataOnNonWrite {
                kind,
                data: data.len(),
            });
        }
        _ => {}
    }
    Ok(NoteMessage {
        op,
        kind,
        offset,
        length,
        data: data.to_vec(),
    })
}

fn parse_payload(header: &Header, payload: &[u8]) -> Result<Message, WireError> {
    let mut reader = Reader {
        kind: header.kind,
        bytes: payload,
        position: 0,
    };
    let message = match header.kind {
        FrameKind::Hello => {
            let node_len = usize::from(reader.u8()?);
            check_node_name_len(node_len)?;
            let node = std::str::from_utf8(reader.take(node_len)?)
                .map_err(|_| WireError::NodeNameNotUtf8)?;
            let base = reader.u64()?;
            let count = reader.u32()?;
            if count as usize > REPAIR_RANGES_MAX {
                return Err(WireError::TooManyRepairRanges { count });
            }
            let mut repair = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let offset = reader.u64()?;
                let length = reader.u64()?;
                check_range("repair range", offset, length)?;
                repair.push(ByteRange { offset, length });
            }
            Message::Hello {
                node: node.to_owned(),
                base,
                rejoin: header.flags.contains(FrameFlags::REJOIN),
                repair,
            }
        }
        FrameKind::CatchUpExtent => {
            let note = parse_note(&mut reader)?;
            if note.kind == NoteKind::Trim {
                return Err(WireError::CatchUpKind { kind: note.kind });
            }
            Message::CatchUpExtent(note)
        }
        FrameKind::Note => Message::Note(parse_note(&mut reader)?),
        FrameKind::CatchUpDone => Message::CatchUpDone {
            through: reader.u64()?,
        },
        FrameKind::Heartbeat => Message::Heartbeat {
            sent_at: reader.u64()?,
            committed: reader.u64()?,
        },
        FrameKind::Ack => Message::Ack {
            committed: reader.u64()?,
            echo: reader.u64()?,
        },
        FrameKind::Stale => Message::Stale {
            epoch: reader.u64()?,
        },
    };
    reader.finish()?;
    Ok(message)
}

/// Turns the bytes of one connection into frames. Feed it with `push` whatever the socket gave, then call
/// `next_frame` until it returns `Ok(None)`; it then holds less than one frame (at most `FRAME_LEN_MAX`
/// bytes, plus whatever the last `push` added). After an error it is poisoned: every later call returns
/// `WireError::Poisoned` and pushed bytes are dropped.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Start of the unparsed bytes in `buffer`; the consumed prefix is dropped lazily, by `push`.
    start: usize,
    /// The header of the frame whose payload we are waiting for, once it passed its checks.
    pending: Option<Header>,
    poisoned: bool,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned {
            return;
        }
        // Drop consumed bytes before growing, so that the buffer's size tracks what is unparsed.
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// Whether the decoder refused the stream.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed, or the reason the stream is refused.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        let result = self.decode_one();
        if result.is_err() {
            self.poisoned = true;
            self.buffer = Vec::new();
            self.start = 0;
            self.pending = None;
        }
        result
    }

    fn decode_one(&mut self) -> Result<Option<Frame>, WireError> {
        let unparsed = &self.buffer[self.start..];
        let Some(header_bytes) = unparsed.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = match self.pending {
            Some(header) => header,
            None => {
                let header = parse_header(header_bytes)?;
                self.pending = Some(header);
                header
            }
        };
        let Some(payload) = unparsed.get(HEADER_LEN..HEADER_LEN + header.payload_len) else {
            return Ok(None);
        };
        let mut zeroed = *header_bytes;
        zeroed[CRC_OFFSET..].fill(0);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&zeroed), payload);
        if computed != header.crc {
            return Err(WireError::BadChecksum {
                expected: header.crc,
                computed,
            });
        }
        let message = parse_payload(&header, payload)?;
        self.start += HEADER_LEN + header.payload_len;
        self.pending = None;
        Ok(Some(Frame {
            volume: header.volume,
            epoch: header.epoch,
            message,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VOLUME: VolumeId = VolumeId(0x0123_4567_89ab_cdef);

    fn frame_bytes(message: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(VOLUME, 7, message, &mut out);
        out
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
        assert_eq!(
            decoder.buffered_len(),
            0,
            "a complete stream leaves nothing behind"
        );
        Ok(frames)
    }

    fn decode_error(bytes: &[u8]) -> WireError {
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes);
        let error = loop {
            match decoder.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream was not refused"),
                Err(error) => break error,
            }
        };
        assert!(decoder.is_poisoned());
        assert_eq!(decoder.next_frame(), Err(WireError::Poisoned));
        error
    }

    /// Recomputes the checksum after a test tampered with a frame, so that the check under test is reached.
    fn reseal(frame: &mut [u8]) {
        frame[CRC_OFFSET..HEADER_LEN].fill(0);
        let crc = crc32c::crc32c(frame);
        frame[CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    /// Builds a frame from raw parts, bypassing `encode`'s validation.
    fn raw_frame(kind: u8, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&MAGIC);
        frame.push(PROTOCOL_VERSION);
        frame.push(kind);
        frame.extend_from_slice(&flags.to_le_bytes());
        frame.extend_from_slice(&VOLUME.0.to_le_bytes());
        frame.extend_from_slice(&7u64.to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(payload);
        reseal(&mut frame);
        frame
    }

    fn raw_note(kind: u8, offset: u64, length: u64, data: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&42u64.to_le_bytes());
        payload.push(kind);
        payload.extend_from_slice(&offset.to_le_bytes());
        payload.extend_from_slice(&length.to_le_bytes());
        payload.extend_from_slice(data);
        payload
    }

    fn raw_hello(node: &[u8], ranges: &[(u64, u64)], count: u32) -> Vec<u8> {
        let mut payload = vec![node.len() as u8];
        payload.extend_from_slice(node);
        payload.extend_from_slice(&5u64.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
        for (offset, length) in ranges {
            payload.extend_from_slice(&offset.to_le_bytes());
            payload.extend_from_slice(&length.to_le_bytes());
        }
        payload
    }

    fn write_note(op: u64, offset: u64, data: Vec<u8>) -> NoteMessage {
        NoteMessage {
            op,
            kind: NoteKind::Write,
            offset,
            length: data.len() as u64,
            data,
        }
    }

    fn one_of_each() -> Vec<Message> {
        vec![
            Message::Hello {
                node: "node-b".into(),
                base: 99,
                rejoin: true,
                repair: vec![ByteRange {
                    offset: 4096,
                    length: 8192,
                }],
            },
            Message::Hello {
                node: "é".repeat(32),
                base: 0,
                rejoin: false,
                repair: vec![],
            },
            Message::CatchUpExtent(write_note(3, 512, vec![0xab; 1000])),
            Message::CatchUpExtent(NoteMessage {
                op: 4,
                kind: NoteKind::Zero,
                offset: 0,
                length: 1 << 40,
                data: vec![],
            }),
            Message::CatchUpDone { through: 12 },
            Message::Note(write_note(13, u64::MAX - 3, vec![1, 2, 3])),
            Message::Note(NoteMessage {
                op: 14,
                kind: NoteKind::Trim,
                offset: 4096,
                length: 4096,
                data: vec![],
            }),
            Message::Heartbeat {
                sent_at: 1,
                committed: 2,
            },
            Message::Ack {
                committed: 3,
                echo: 4,
            },
            Message::Stale { epoch: 8 },
        ]
    }

    fn arb_note(kinds: Vec<NoteKind>) -> impl Strategy<Value = NoteMessage> {
        (
            any::<u64>(),
            proptest::sample::select(kinds),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 1..600),
            1..u64::MAX,
        )
            .prop_map(|(op, kind, offset, data, length)| match kind {
                NoteKind::Write => {
                    let offset = offset.min(u64::MAX - data.len() as u64);
                    write_note(op, offset, data)
                }
                _ => NoteMessage {
                    op,
                    kind,
                    offset: offset.min(u64::MAX - length),
                    length,
                    data: vec![],
                },
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let range = (any::<u64>(), 1..u64::MAX).prop_map(|(offset, length)| ByteRange {
            offset: offset.min(u64::MAX - length),
            length,
        });
        prop_oneof![
            (
                "[a-z0-9é-]{1,21}",
                any::<u64>(),
                any::<bool>(),
                proptest::collection::vec(range, 0..20)
            )
                .prop_map(|(node, base, rejoin, repair)| Message::Hello {
                    node,
                    base,
                    rejoin,
                    repair
                }),
            arb_note(vec![NoteKind::Write, NoteKind::Zero]).prop_map(Message::CatchUpExtent),
            any::<u64>().prop_map(|through| Message::CatchUpDone { through }),
            arb_note(vec![NoteKind::Write, NoteKind::Trim, NoteKind::Zero]).prop_map(Message::Note),
            (any::<u64>(), any::<u64>())
                .prop_map(|(sent_at, committed)| Message::Heartbeat { sent_at, committed }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(committed, echo)| Message::Ack { committed, echo }),
            any::<u64>().prop_map(|epoch| Message::Stale { epoch }),
        ]
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_refused(message in arb_message(), bit in any::<usize>()) {
            let mut frame = frame_bytes(&message);
            let bit = bit % (frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            let mut decoder = FrameDecoder::new();
            decoder.push(&frame);
            // Refused, or (a length grown by the flip) still waiting for bytes: never a frame.
            prop_assert!(!matches!(decoder.next_frame(), Ok(Some(_))));
        }

        #[test]
        fn garbage_never_panics_and_stays_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            while let Ok(Some(_)) = decoder.next_frame() {}
            prop_assert!(decoder.buffered_len() <= bytes.len());
        }

        #[test]
        fn every_message_round_trips(
            messages in proptest::collection::vec((arb_message(), any::<u64>(), any::<u64>()), 1..8),
            chunk in 1usize..200,
        ) {
            let mut stream = Vec::new();
            for (message, volume, epoch) in &messages {
                encode(VolumeId(*volume), *epoch, message, &mut stream);
            }
            // Whole, then in chunks of random size.
            let frames = decode_all(&stream).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut decoder = FrameDecoder::new();
            let mut chunked = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().map_err(|e| TestCaseError::fail(e.to_string()))? {
                    chunked.push(frame);
                }
            }
            prop_assert_eq!(&frames, &chunked);
            prop_assert_eq!(frames.len(), messages.len());
            let mut reencoded = Vec::new();
            for (frame, (message, volume, epoch)) in frames.iter().zip(&messages) {
                prop_assert_eq!(&frame.message, message);
                prop_assert_eq!(frame.volume, VolumeId(*volume));
                prop_assert_eq!(frame.epoch, *epoch);
                encode(frame.volume, frame.epoch, &frame.message, &mut reencoded);
            }
            prop_assert_eq!(reencoded, stream);
        }
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode() {
        let messages = one_of_each();
        let mut stream = Vec::new();
        for message in &messages {
            encode(VOLUME, 7, message, &mut stream);
        }
        for split in 0..=stream.len() {
            let mut decoder = FrameDecoder::new();
            let mut decoded = Vec::new();
            for piece in [&stream[..split], &stream[split..]] {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().expect("valid stream") {
                    decoded.push(frame.message);
                }
            }
            assert_eq!(decoded, messages, "split at {split}");
        }
        // And one byte at a time.
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        for byte in &stream {
            decoder.push(std::slice::from_ref(byte));
            while let Some(frame) = decoder.next_frame().expect("valid stream") {
                decoded.push(frame.message);
            }
            assert!(decoder.buffered_len() < FRAME_LEN_MAX);
        }
        assert_eq!(decoded, messages);
    }

    #[test]
    fn many_frames_in_one_buffer() {
        let mut stream = Vec::new();
        for op in 0..1000u64 {
            encode(
                VOLUME,
                op,
                &Message::Ack {
                    committed: op,
                    echo: op * 2,
                },
                &mut stream,
            );
        }
        let frames = decode_all(&stream).expect("valid stream");
        assert_eq!(frames.len(), 1000);
        for (op, frame) in frames.iter().enumerate() {
            assert_eq!(frame.epoch, op as u64);
            assert_eq!(
                frame.message,
                Message::Ack {
                    committed: op as u64,
                    echo: op as u64 * 2
                }
            );
        }
    }

    #[test]
    fn largest_write_note_is_accepted() {
        let message = Message::Note(write_note(1, 0, vec![7; NOTE_DATA_MAX]));
        let frame = frame_bytes(&message);
        assert_eq!(frame.len(), FRAME_LEN_MAX);
        assert_eq!(
            decode_all(&frame).expect("valid").remove(0).message,
            message
        );
    }

    #[test]
    fn volume_id_is_the_sha256_prefix_of_the_name() {
        // sha256("vol0") = 5b1f4f97 1cb0e7bb ...
        let digest = Sha256::digest(b"vol0");
        let id = VolumeId::from_name("vol0");
        assert_eq!(id.0.to_le_bytes(), digest[..8]);
        assert_ne!(id, VolumeId::from_name("vol1"));
        let frame = frame_bytes(&Message::Stale { epoch: 1 });
        let mut stamped = Vec::new();
        encode(id, 1, &Message::Stale { epoch: 1 }, &mut stamped);
        assert_eq!(stamped[8..16], digest[..8]);
        assert_eq!(frame.len(), stamped.len());
    }

    #[test]
    fn header_layout_is_as_documented() {
        let frame = frame_bytes(&Message::Hello {
            node: "a".into(),
            base: 1,
            rejoin: true,
            repair: vec![],
        });
        assert_eq!(&frame[0..4], b"FBRP");
        assert_eq!(frame[4], 1);
        assert_eq!(frame[5], FrameKind::Hello as u8);
        assert_eq!(le_u16(&frame[6..8]), FrameFlags::REJOIN.bits());
        assert_eq!(le_u64(&frame[8..16]), VOLUME.0);
        assert_eq!(le_u64(&frame[16..24]), 7);
        assert_eq!(le_u32(&frame[24..28]) as usize, frame.len() - HEADER_LEN);
        let mut zeroed = frame.clone();
        zeroed[28..32].fill(0);
        assert_eq!(le_u32(&frame[28..32]), crc32c::crc32c(&zeroed));
    }

    #[test]
    fn refuses_bad_magic() {
        let mut frame = frame_bytes(&Message::Stale { epoch: 1 });
        frame[0] = b'X';
        assert_eq!(
            decode_error(&frame),
            WireError::BadMagic { found: *b"XBRP" }
        );
    }

    #[test]
    fn refuses_unknown_version() {
        let mut frame = frame_bytes(&Message::Stale { epoch: 1 });
        frame[4] = 2;
        reseal(&mut frame);
        assert_eq!(
            decode_error(&frame),
            WireError::UnsupportedVersion { found: 2 }
        );
    }

    #[test]
    fn refuses_unknown_kind() {
        for kind in [0u8, 8, 255] {
            assert_eq!(
                decode_error(&raw_frame(kind, 0, &[0; 8])),
                WireError::UnknownKind { found: kind }
            );
        }
    }

    #[test]
    fn refuses_unknown_flags_and_flags_on_the_wrong_kind() {
        assert_eq!(
            decode_error(&raw_frame(7, 1 << 1, &[0; 8])),
            WireError::UnknownFlags { bits: 2 }
        );
        assert_eq!(
            decode_error(&raw_frame(7, 0x8000, &[0; 8])),
            WireError::UnknownFlags { bits: 0x8000 }
        );
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Stale as u8,
                FrameFlags::REJOIN.bits(),
                &[0; 8]
            )),
            WireError::FlagsNotAllowed {
                kind: FrameKind::Stale,
                bits: 1
            }
        );
    }

    #[test]
    fn refuses_payload_over_its_kind_limit_before_buffering_it() {
        let mut decoder = FrameDecoder::new();
        let mut header = raw_frame(FrameKind::Note as u8, 0, &[]);
        header[24..28]
            .copy_from_slice(&((NOTE_HEADER_LEN + NOTE_DATA_MAX + 1) as u32).to_le_bytes());
        decoder.push(&header);
        assert_eq!(
            decoder.next_frame(),
            Err(WireError::PayloadTooLong {
                kind: FrameKind::Note,
                length: (NOTE_HEADER_LEN + NOTE_DATA_MAX + 1) as u32,
                max: NOTE_HEADER_LEN + NOTE_DATA_MAX
            })
        );
        let mut ack = raw_frame(FrameKind::Ack as u8, 0, &[0; 16]);
        ack[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_error(&ack),
            WireError::PayloadTooLong {
                kind: FrameKind::Ack,
                ..
            }
        ));
    }

    #[test]
    fn refuses_bad_checksum_anywhere_in_the_frame() {
        let frame = frame_bytes(&Message::Note(write_note(1, 0, vec![5; 64])));
        // Flip one bit of the volume, the epoch, the checksum and the data in turn.
        for position in [8, 16, 29, HEADER_LEN + NOTE_HEADER_LEN + 10] {
            let mut tampered = frame.clone();
            tampered[position] ^= 0x10;
            assert!(
                matches!(decode_error(&tampered), WireError::BadChecksum { .. }),
                "position {position}"
            );
        }
    }

    #[test]
    fn refuses_short_and_trailing_payloads() {
        assert_eq!(
            decode_error(&raw_frame(FrameKind::Stale as u8, 0, &[0; 7])),
            WireError::ShortPayload {
                kind: FrameKind::Stale,
                length: 7
            }
        );
        assert_eq!(
            decode_error(&raw_frame(FrameKind::Ack as u8, 0, &[0; 15])),
            WireError::ShortPayload {
                kind: FrameKind::Ack,
                length: 15
            }
        );
        assert_eq!(
            decode_error(&raw_frame(FrameKind::CatchUpDone as u8, 0, &[0; 9])),
            WireError::PayloadTooLong {
                kind: FrameKind::CatchUpDone,
                length: 9,
                max: 8
            }
        );
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Note as u8,
                0,
                &[0; NOTE_HEADER_LEN - 1]
            )),
            WireError::ShortPayload {
                kind: FrameKind::Note,
                length: NOTE_HEADER_LEN - 1
            }
        );
        // Hello: fewer ranges than announced, then more bytes than announced.
        let short = raw_hello(b"node", &[(0, 1)], 2);
        assert_eq!(
            decode_error(&raw_frame(FrameKind::Hello as u8, 0, &short)),
            WireError::ShortPayload {
                kind: FrameKind::Hello,
                length: short.len()
            }
        );
        let trailing = raw_hello(b"node", &[(0, 1), (4, 4)], 1);
        assert_eq!(
            decode_error(&raw_frame(FrameKind::Hello as u8, 0, &trailing)),
            WireError::TrailingBytes {
                kind: FrameKind::Hello,
                extra: 16
            }
        );
        let mut name_runs_out = vec![10u8];
        name_runs_out.extend_from_slice(b"abc");
        assert!(matches!(
            decode_error(&raw_frame(FrameKind::Hello as u8, 0, &name_runs_out)),
            WireError::ShortPayload {
                kind: FrameKind::Hello,
                ..
            }
        ));
    }

    #[test]
    fn refuses_bad_node_names() {
        let long = [b'n'; NODE_NAME_MAX + 1];
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Hello as u8,
                0,
                &raw_hello(&long, &[], 0)
            )),
            WireError::NodeNameLength {
                length: NODE_NAME_MAX + 1
            }
        );
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Hello as u8,
                0,
                &raw_hello(b"", &[], 0)
            )),
            WireError::NodeNameLength { length: 0 }
        );
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Hello as u8,
                0,
                &raw_hello(&[0xff, 0xfe], &[], 0)
            )),
            WireError::NodeNameNotUtf8
        );
        let longest = "n".repeat(NODE_NAME_MAX);
        let hello = Message::Hello {
            node: longest,
            base: 0,
            rejoin: false,
            repair: vec![],
        };
        assert_eq!(
            decode_all(&frame_bytes(&hello))
                .expect("valid")
                .remove(0)
                .message,
            hello
        );
    }

    #[test]
    fn refuses_too_many_repair_ranges_and_bad_ranges() {
        let count = REPAIR_RANGES_MAX as u32 + 1;
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Hello as u8,
                0,
                &raw_hello(b"b", &[], count)
            )),
            WireError::TooManyRepairRanges { count }
        );
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Hello as u8,
                0,
                &raw_hello(b"b", &[(8, 0)], 1)
            )),
            WireError::ZeroLength {
                what: "repair range",
                offset: 8
            }
        );
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::Hello as u8,
                0,
                &raw_hello(b"b", &[(u64::MAX, 1)], 1)
            )),
            WireError::RangeOverflow {
                what: "repair range",
                offset: u64::MAX,
                length: 1
            }
        );
    }

    #[test]
    fn refuses_bad_notes() {
        let note = FrameKind::Note as u8;
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(0, 0, 1, &[]))),
            WireError::UnknownNoteKind { found: 0 }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(4, 0, 1, &[]))),
            WireError::UnknownNoteKind { found: 4 }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(1, 0, 4, &[1, 2, 3]))),
            WireError::WriteDataLength { length: 4, data: 3 }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(1, 0, 2, &[1, 2, 3]))),
            WireError::WriteDataLength { length: 2, data: 3 }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(2, 0, 4096, &[0]))),
            WireError::DataOnNonWrite {
                kind: NoteKind::Trim,
                data: 1
            }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(3, 0, 4096, &[0; 4]))),
            WireError::DataOnNonWrite {
                kind: NoteKind::Zero,
                data: 4
            }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(2, 512, 0, &[]))),
            WireError::ZeroLength {
                what: "note",
                offset: 512
            }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(1, 512, 0, &[]))),
            WireError::ZeroLength {
                what: "note",
                offset: 512
            }
        );
        assert_eq!(
            decode_error(&raw_frame(note, 0, &raw_note(3, u64::MAX - 10, 11, &[]))),
            WireError::RangeOverflow {
                what: "note",
                offset: u64::MAX - 10,
                length: 11
            }
        );
        assert_eq!(
            decode_error(&raw_frame(
                FrameKind::CatchUpExtent as u8,
                0,
                &raw_note(2, 0, 1, &[])
            )),
            WireError::CatchUpKind {
                kind: NoteKind::Trim
            }
        );
    }

    #[test]
    fn error_poisons_the_decoder_even_after_good_frames() {
        let mut stream = frame_bytes(&Message::Stale { epoch: 1 });
        stream.extend_from_slice(b"garbage garbage garbage garbage garbage");
        let mut decoder = FrameDecoder::new();
        decoder.push(&stream);
        assert!(matches!(decoder.next_frame(), Ok(Some(_))));
        assert!(matches!(
            decoder.next_frame(),
            Err(WireError::BadMagic { .. })
        ));
        decoder.push(&frame_bytes(&Message::Stale { epoch: 1 }));
        assert_eq!(decoder.next_frame(), Err(WireError::Poisoned));
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn validate_matches_what_the_decoder_refuses() {
        for message in one_of_each() {
            assert_eq!(validate(&message), Ok(()));
        }
        let bad = [
            Message::Note(NoteMessage {
                op: 1,
                kind: NoteKind::Write,
                offset: 0,
                length: 5,
                data: vec![0; 4],
            }),
            Message::Note(NoteMessage {
                op: 1,
                kind: NoteKind::Zero,
                offset: 0,
                length: 0,
                data: vec![],
            }),
            Message::CatchUpExtent(NoteMessage {
                op: 1,
                kind: NoteKind::Trim,
                offset: 0,
                length: 1,
                data: vec![],
            }),
            Message::Hello {
                node: String::new(),
                base: 0,
                rejoin: false,
                repair: vec![],
            },
            Message::Hello {
                node: "n".repeat(65),
                base: 0,
                rejoin: false,
                repair: vec![],
            },
            Message::Note(write_note(1, 0, vec![0; NOTE_DATA_MAX + 1])),
        ];
        for message in &bad {
            assert!(validate(message).is_err(), "{message:?}");
        }
    }

    #[test]
    #[should_panic(expected = "refusing to encode")]
    fn encode_refuses_an_invalid_message() {
        let message = Message::Note(NoteMessage {
            op: 1,
            kind: NoteKind::Write,
            offset: 0,
            length: 5,
            data: vec![0; 4],
        });
        frame_bytes(&message);
    }
}
