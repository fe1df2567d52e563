//! NBD wire format: constants, and the codec between bytes and validated types.
//!
//! Owns: every magic number, option, command and flag value of the fixed newstyle protocol, the decoding of
//! the client's option and request headers into typed values, and the encoding of the server's replies.
//! Must never: touch a socket, allocate per request, or trust a length from the client before checking it
//! against a named limit.
//!
//! All integers on the wire are big-endian ("network byte order").

use bitflags::bitflags;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Largest request payload (and read length) we accept; also what INFO_BLOCK_SIZE advertises as maximum.
pub const REQUEST_LENGTH_MAX: u32 = 32 * 1024 * 1024;
/// Every offset and length must be a multiple of this (advertised as the minimum block size).
pub const BLOCK_SIZE_MIN: u32 = 512;
/// Advertised preferred block size: the memory backend's page and the file backend's O_DIRECT unit.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Largest option payload we read into memory; longer ones are discarded and refused with ERR_TOO_BIG.
pub const OPTION_LENGTH_MAX: u32 = 64 * 1024;
/// The spec's bound on a string (export name, query).
pub const STRING_LENGTH_MAX: usize = 4096;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an option header on the wire (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

bitflags! {
    /// Handshake flags sent by the server after the magics.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct HandshakeFlags: u16 {
        const FIXED_NEWSTYLE = 1 << 0;
        const NO_ZEROES = 1 << 1;
    }

    /// Client flags, the client's answer to the handshake flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ClientFlags: u32 {
        const FIXED_NEWSTYLE = 1 << 0;
        const NO_ZEROES = 1 << 1;
    }

    /// Per-export transmission flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TransmissionFlags: u16 {
        const HAS_FLAGS = 1 << 0;
        const READ_ONLY = 1 << 1;
        const SEND_FLUSH = 1 << 2;
        const SEND_FUA = 1 << 3;
        const ROTATIONAL = 1 << 4;
        const SEND_TRIM = 1 << 5;
        const SEND_WRITE_ZEROES = 1 << 6;
        const SEND_DF = 1 << 7;
        const CAN_MULTI_CONN = 1 << 8;
        const SEND_RESIZE = 1 << 9;
        const SEND_CACHE = 1 << 10;
        const SEND_FAST_ZERO = 1 << 11;
    }

    /// Per-command flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CommandFlags: u16 {
        const FUA = 1 << 0;
        const NO_HOLE = 1 << 1;
        const DF = 1 << 2;
        const REQ_ONE = 1 << 3;
        const FAST_ZERO = 1 << 4;
        const PAYLOAD_LEN = 1 << 5;
    }
}

/// Option numbers (client to server, during negotiation).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (server to client, during negotiation).
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types inside NBD_REP_INFO.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Structured reply chunk types.
pub mod chunk {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Flag on the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
}

/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The only metadata context we offer, and the id we give it.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Errno values as the protocol defines them (not the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// Command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A type we do not implement; carries the raw value for the log.
    Unknown(u16),
}

impl Command {
    pub fn from_wire(value: u16) -> Command {
        match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

/// A request header as it came off the wire (magic already checked), before validation against an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: CommandFlags,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header could not be decoded at all: the stream cannot be resynchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

/// Decodes a request header from exactly `REQUEST_HEADER_LEN` bytes.
pub fn decode_request(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, HeaderError> {
    let magic = be_u32(&bytes[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    Ok(RequestHeader {
        // Unknown flag bits are kept out of the typed value; validation rejects them separately.
        flags: CommandFlags::from_bits_retain(be_u16(&bytes[4..6])),
        command: Command::from_wire(be_u16(&bytes[6..8])),
        cookie: be_u64(&bytes[8..16]),
        offset: be_u64(&bytes[16..24]),
        length: be_u32(&bytes[24..28]),
    })
}

/// Encodes a request header (used by tests, fuzzing and the bench client).
pub fn encode_request(header: &RequestHeader, command_wire: u16) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&header.flags.bits().to_be_bytes());
    out[6..8].copy_from_slice(&command_wire.to_be_bytes());
    out[8..16].copy_from_slice(&header.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&header.offset.to_be_bytes());
    out[24..28].copy_from_slice(&header.length.to_be_bytes());
    out
}

/// An option header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Decodes an option header; `None` when the magic is wrong (the client is not speaking NBD).
pub fn decode_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
    if be_u64(&bytes[0..8]) != IHAVEOPT {
        return None;
    }
    Some(OptionHeader {
        option: be_u32(&bytes[8..12]),
        length: be_u32(&bytes[12..16]),
    })
}

/// The largest simple or structured reply header we ever build (structured + an 8-byte offset or
/// 4-byte context id, or an error chunk's errno and message length).
pub const REPLY_HEADER_LEN_MAX: usize = 32;

/// A reply header stored inline: no allocation per reply.
#[derive(Debug, Clone, Copy)]
pub struct ReplyHeader {
    pub bytes: [u8; REPLY_HEADER_LEN_MAX],
    pub len: u8,
}

impl ReplyHeader {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn build(parts: &[&[u8]]) -> ReplyHeader {
        let mut header = ReplyHeader {
            bytes: [0; REPLY_HEADER_LEN_MAX],
            len: 0,
        };
        let mut at = 0usize;
        for part in parts {
            header.bytes[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        debug_assert!(at <= REPLY_HEADER_LEN_MAX);
        header.len = at as u8;
        header
    }

    /// Simple reply; for a successful read, the data follows.
    pub fn simple(cookie: u64, error: u32) -> ReplyHeader {
        ReplyHeader::build(&[
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            &error.to_be_bytes(),
            &cookie.to_be_bytes(),
        ])
    }

    /// Structured chunk header; `payload_len` counts everything after this 20-byte header, including any
    /// `extra` bytes placed in the header itself.
    pub fn structured(
        cookie: u64,
        flags: u16,
        kind: u16,
        payload_len: u32,
        extra: &[u8],
    ) -> ReplyHeader {
        ReplyHeader::build(&[
            &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
            &flags.to_be_bytes(),
            &kind.to_be_bytes(),
            &cookie.to_be_bytes(),
            &payload_len.to_be_bytes(),
            extra,
        ])
    }

    /// One structured OFFSET_DATA chunk that ends the reply; `data_len` bytes follow.
    pub fn read_data(cookie: u64, offset: u64, data_len: u32) -> ReplyHeader {
        ReplyHeader::structured(
            cookie,
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            8 + data_len,
            &offset.to_be_bytes(),
        )
    }

    /// Structured BLOCK_STATUS chunk ending the reply; `descriptors_len` bytes of descriptors follow.
    pub fn block_status(cookie: u64, context_id: u32, descriptors_len: u32) -> ReplyHeader {
        ReplyHeader::structured(
            cookie,
            chunk::FLAG_DONE,
            chunk::BLOCK_STATUS,
            4 + descriptors_len,
            &context_id.to_be_bytes(),
        )
    }

    /// Structured error chunk (no message) ending the reply.
    pub fn structured_error(cookie: u64, error: u32) -> ReplyHeader {
        let mut extra = [0u8; 6];
        extra[0..4].copy_from_slice(&error.to_be_bytes());
        ReplyHeader::structured(cookie, chunk::FLAG_DONE, chunk::ERROR, 6, &extra)
    }

    /// Structured NONE chunk: success without payload.
    pub fn structured_done(cookie: u64) -> ReplyHeader {
        ReplyHeader::structured(cookie, chunk::FLAG_DONE, chunk::NONE, 0, &[])
    }
}

/// Appends an option reply (header and data) to `out`.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A cursor over option data that refuses to read past the end, so that a lying length field is an error,
/// not a panic.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be_u16)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be_u32)
    }

    pub fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < len {
            return None;
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Some(head)
    }

    /// A string prefixed by its 32-bit length, bounded by the spec's string limit.
    pub fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > STRING_LENGTH_MAX {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

pub fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

pub fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

pub fn be_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let header = RequestHeader {
            flags: CommandFlags::FUA,
            command: Command::Write,
            cookie: 0x1122_3344_5566_7788,
            offset: 4096,
            length: 512,
        };
        let bytes = encode_request(&header, 1);
        assert_eq!(decode_request(&bytes), Ok(header));
    }

    #[test]
    fn bad_request_magic_is_refused() {
        let mut bytes = [0u8; REQUEST_HEADER_LEN];
        bytes[0] = 0xde;
        assert!(matches!(
            decode_request(&bytes),
            Err(HeaderError::BadMagic(_))
        ));
    }

    #[test]
    fn option_header_needs_ihaveopt() {
        let mut bytes = [0u8; OPTION_HEADER_LEN];
        assert_eq!(decode_option_header(&bytes), None);
        bytes[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        bytes[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        bytes[12..16].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&bytes),
            Some(OptionHeader {
                option: opt::GO,
                length: 7
            })
        );
    }

    #[test]
    fn reply_headers_have_wire_sizes() {
        assert_eq!(ReplyHeader::simple(1, 0).as_slice().len(), 16);
        assert_eq!(ReplyHeader::read_data(1, 0, 4096).as_slice().len(), 28);
        assert_eq!(ReplyHeader::block_status(1, 1, 8).as_slice().len(), 24);
        assert_eq!(ReplyHeader::structured_error(1, 22).as_slice().len(), 26);
        assert_eq!(ReplyHeader::structured_done(1).as_slice().len(), 20);
        let data = ReplyHeader::read_data(7, 512, 4096);
        assert_eq!(be_u32(&data.bytes[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u32(&data.bytes[16..20]), 8 + 4096);
        assert_eq!(be_u64(&data.bytes[20..28]), 512);
    }

    #[test]
    fn reader_refuses_lying_lengths() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&100u32.to_be_bytes());
        bytes.extend_from_slice(b"short");
        assert_eq!(Reader::new(&bytes).string(), None);
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Reader::new(&huge).string(), None);
    }
}
