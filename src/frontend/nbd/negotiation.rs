//! The NBD handshake and option haggling, as a sans-IO state machine.
//!
//! Owns: the state between the greeting and the transmission phase: client flags, structured replies, the
//! selected metadata contexts and the chosen export. It takes bytes and appends reply bytes; it never sees
//! a socket, so tests and the fuzzer drive exactly the code the server runs.
//! Must never: read past the bytes it was given, keep more than one option (at most `OPTION_LENGTH_MAX`
//! bytes) in memory, or let a malformed option do anything but produce an error reply or a disconnect.

use crate::frontend::nbd::proto::{
    self, BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, ClientFlags, HandshakeFlags, META_BASE_ALLOCATION,
    META_BASE_ALLOCATION_ID, NBDMAGIC, OPTION_HEADER_LEN, OPTION_LENGTH_MAX, REQUEST_LENGTH_MAX,
    Reader, TransmissionFlags, info, opt, rep,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One export as the negotiation sees it.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    /// Flags before per-connection adjustments (SEND_DF depends on structured replies).
    pub flags: TransmissionFlags,
    /// Whether the export is offered now: a replicated volume is offered only by its master (an
    /// unoffered export is unknown to clients, as if it did not exist).
    pub offered: Arc<AtomicBool>,
}

impl ExportInfo {
    pub fn new(
        name: String,
        description: String,
        size_bytes: u64,
        flags: TransmissionFlags,
    ) -> ExportInfo {
        ExportInfo {
            name,
            description,
            size_bytes,
            flags,
            offered: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn is_offered(&self) -> bool {
        self.offered.load(Ordering::Relaxed)
    }
}

/// Why a negotiation ended without a transmission phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("client flags {0:#x} carry bits we did not offer")]
    BadClientFlags(u32),
    #[error("option header without the IHAVEOPT magic: not an NBD client")]
    BadOptionMagic,
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExportName(String),
    #[error("client aborted the negotiation")]
    Aborted,
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// Index into the export list.
    pub export: usize,
    pub structured_replies: bool,
    pub base_allocation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        length: u32,
    },
    /// Skipping the data of an over-long option before refusing it.
    Discard {
        option: u32,
        remaining: u32,
    },
    Finished,
}

/// Result of feeding bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Need more input; `consumed` bytes of what was given were used.
    NeedMore,
    /// Negotiation finished; the bytes after `consumed` belong to the transmission phase.
    Transmission(Agreement),
    /// Send what was queued, then close the connection.
    Close(NegotiationError),
}

pub struct Negotiation {
    state: State,
    no_zeroes: bool,
    structured_replies: bool,
    base_allocation: bool,
}

impl Negotiation {
    /// Starts a negotiation, appending the server's greeting to `out`.
    pub fn start(out: &mut Vec<u8>) -> Negotiation {
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(
            &(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES)
                .bits()
                .to_be_bytes(),
        );
        Negotiation {
            state: State::ClientFlags,
            no_zeroes: false,
            structured_replies: false,
            base_allocation: false,
        }
    }

    /// How many more bytes the current state needs at least before `feed` can progress. The connection
    /// uses it to size its reads; it is never more than an option header plus `OPTION_LENGTH_MAX`.
    pub fn bytes_wanted(&self) -> usize {
        match self.state {
            State::ClientFlags => 4,
            State::OptionHeader => OPTION_HEADER_LEN,
            State::OptionData { length, .. } => length as usize,
            State::Discard { .. } => 1,
            State::Finished => 0,
        }
    }

    /// Consumes as much of `input` as possible, appending replies to `out`. Returns the bytes consumed
    /// and what happens next.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        exports: &[ExportInfo],
    ) -> (usize, Step) {
        let mut consumed = 0usize;
        loop {
            let available = &input[consumed..];
            match self.state {
                State::Finished => return (consumed, Step::NeedMore),
                State::ClientFlags => {
                    let Some(bytes) = available.get(..4) else {
                        return (consumed, Step::NeedMore);
                    };
                    consumed += 4;
                    let raw = proto::be_u32(bytes);
                    let Some(flags) = ClientFlags::from_bits(raw) else {
                        return self.close(consumed, NegotiationError::BadClientFlags(raw));
                    };
                    self.no_zeroes = flags.contains(ClientFlags::NO_ZEROES);
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    let Some(bytes) = available.get(..OPTION_HEADER_LEN) else {
                        return (consumed, Step::NeedMore);
                    };
                    consumed += OPTION_HEADER_LEN;
                    let header = proto::decode_option_header(bytes.try_into().expect("16 bytes"));
                    let Some(header) = header else {
                        return self.close(consumed, NegotiationError::BadOptionMagic);
                    };
                    self.state = if header.length > OPTION_LENGTH_MAX {
                        State::Discard {
                            option: header.option,
                            remaining: header.length,
                        }
                    } else {
                        State::OptionData {
                            option: header.option,
                            length: header.length,
                        }
                    };
                }
                State::Discard { option, remaining } => {
                    let skip = (remaining as usize).min(available.len());
                    consumed += skip;
                    let remaining = remaining - skip as u32;
                    if remaining > 0 {
                        self.state = State::Discard { option, remaining };
                        return (consumed, Step::NeedMore);
                    }
                    tracing::warn!(option, "option data over {OPTION_LENGTH_MAX} bytes refused");
                    error_reply(out, option, rep::ERR_TOO_BIG, "option data too long");
                    self.state = State::OptionHeader;
                }
                State::OptionData { option, length } => {
                    let Some(data) = available.get(..length as usize) else {
                        return (consumed, Step::NeedMore);
                    };
                    consumed += length as usize;
                    self.state = State::OptionHeader;
                    if let Some(step) = self.option(option, data, out, exports) {
                        if matches!(step, Step::Transmission(_) | Step::Close(_)) {
                            self.state = State::Finished;
                        }
                        return (consumed, step);
                    }
                }
            }
        }
    }

    fn close(&mut self, consumed: usize, error: NegotiationError) -> (usize, Step) {
        self.state = State::Finished;
        (consumed, Step::Close(error))
    }

    /// Handles one complete option; `None` means "carry on haggling".
    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
        exports: &[ExportInfo],
    ) -> Option<Step> {
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                let Some(index) = find_export(exports, &name) else {
                    return Some(Step::Close(NegotiationError::UnknownExportName(
                        name.into_owned(),
                    )));
                };
                let export = &exports[index];
                out.extend_from_slice(&export.size_bytes.to_be_bytes());
                out.extend_from_slice(&self.transmission_flags(export).bits().to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Some(Step::Transmission(self.agreement(index)))
            }
            opt::ABORT => {
                proto::push_option_reply(out, option, rep::ACK, &[]);
                Some(Step::Close(NegotiationError::Aborted))
            }
            opt::LIST => {
                if !data.is_empty() {
                    error_reply(out, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return None;
                }
                for export in exports.iter().filter(|export| export.is_offered()) {
                    let mut entry =
                        Vec::with_capacity(4 + export.name.len() + export.description.len());
                    entry.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(export.name.as_bytes());
                    entry.extend_from_slice(export.description.as_bytes());
                    proto::push_option_reply(out, option, rep::SERVER, &entry);
                }
                proto::push_option_reply(out, option, rep::ACK, &[]);
                None
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error_reply(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured_replies = true;
                    proto::push_option_reply(out, option, rep::ACK, &[]);
                }
                None
            }
            opt::INFO | opt::GO => self.info_or_go(option, data, out, exports),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data, out, exports);
                None
            }
            opt::STARTTLS => {
                error_reply(
                    out,
                    option,
                    rep::ERR_UNSUP,
                    "TLS is not supported by this server",
                );
                None
            }
            _ => {
                tracing::debug!(option, "unknown option refused");
                error_reply(out, option, rep::ERR_UNSUP, "unknown option");
                None
            }
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
        exports: &[ExportInfo],
    ) -> Option<Step> {
        let mut reader = Reader::new(data);
        let Some(name) = reader.string() else {
            error_reply(out, option, rep::ERR_INVALID, "malformed export name");
            return None;
        };
        let mut requested = [false; 4];
        let Some(count) = reader.u16() else {
            error_reply(
                out,
                option,
                rep::ERR_INVALID,
                "missing information request count",
            );
            return None;
        };
        for _ in 0..count {
            let Some(kind) = reader.u16() else {
                error_reply(
                    out,
                    option,
                    rep::ERR_INVALID,
                    "truncated information requests",
                );
                return None;
            };
            if let Some(flag) = requested.get_mut(usize::from(kind)) {
                *flag = true;
            }
        }
        if !reader.is_empty() {
            error_reply(
                out,
                option,
                rep::ERR_INVALID,
                "trailing bytes after information requests",
            );
            return None;
        }
        let Some(index) = find_export(exports, name) else {
            error_reply(out, option, rep::ERR_UNKNOWN, "no such export");
            return None;
        };
        let export = &exports[index];
        let mut reply = Vec::with_capacity(16);
        reply.extend_from_slice(&info::EXPORT.to_be_bytes());
        reply.extend_from_slice(&export.size_bytes.to_be_bytes());
        reply.extend_from_slice(&self.transmission_flags(export).bits().to_be_bytes());
        proto::push_option_reply(out, option, rep::INFO, &reply);
        if requested[usize::from(info::NAME)] {
            let mut reply = info::NAME.to_be_bytes().to_vec();
            reply.extend_from_slice(export.name.as_bytes());
            proto::push_option_reply(out, option, rep::INFO, &reply);
        }
        if requested[usize::from(info::DESCRIPTION)] && !export.description.is_empty() {
            let mut reply = info::DESCRIPTION.to_be_bytes().to_vec();
            reply.extend_from_slice(export.description.as_bytes());
            proto::push_option_reply(out, option, rep::INFO, &reply);
        }
        // Always sent: we enforce these constraints, so every client should know them.
        let mut reply = Vec::with_capacity(14);
        reply.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        reply.extend_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
        reply.extend_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
        reply.extend_from_slice(&REQUEST_LENGTH_MAX.to_be_bytes());
        proto::push_option_reply(out, option, rep::INFO, &reply);
        proto::push_option_reply(out, option, rep::ACK, &[]);
        (option == opt::GO).then(|| Step::Transmission(self.agreement(index)))
    }

    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
        exports: &[ExportInfo],
    ) {
        let setting = option == opt::SET_META_CONTEXT;
        if !self.structured_replies {
            error_reply(
                out,
                option,
                rep::ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let mut reader = Reader::new(data);
        let (Some(name), Some(count)) = (reader.string(), reader.u32()) else {
            error_reply(
                out,
                option,
                rep::ERR_INVALID,
                "malformed meta context request",
            );
            return;
        };
        let mut selected = false;
        for _ in 0..count {
            let Some(query) = reader.string() else {
                error_reply(
                    out,
                    option,
                    rep::ERR_INVALID,
                    "malformed meta context query",
                );
                return;
            };
            // `base:` alone lists every context of the namespace; only an exact name selects one.
            let matches = query == META_BASE_ALLOCATION || (!setting && query == "base:");
            selected |= matches;
        }
        if !reader.is_empty() {
            error_reply(
                out,
                option,
                rep::ERR_INVALID,
                "trailing bytes after meta context queries",
            );
            return;
        }
        if find_export(exports, name).is_none() {
            error_reply(out, option, rep::ERR_UNKNOWN, "no such export");
            return;
        }
        // LIST with no query lists everything we have.
        if !setting && count == 0 {
            selected = true;
        }
        if selected {
            let mut reply = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
            let id = if setting { META_BASE_ALLOCATION_ID } else { 0 };
            reply.extend_from_slice(&id.to_be_bytes());
            reply.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            proto::push_option_reply(out, option, rep::META_CONTEXT, &reply);
        }
        if setting {
            self.base_allocation = selected;
        }
        proto::push_option_reply(out, option, rep::ACK, &[]);
    }

    fn transmission_flags(&self, export: &ExportInfo) -> TransmissionFlags {
        let mut flags = export.flags | TransmissionFlags::HAS_FLAGS;
        if self.structured_replies {
            flags |= TransmissionFlags::SEND_DF;
        }
        flags
    }

    fn agreement(&self, export: usize) -> Agreement {
        Agreement {
            export,
            structured_replies: self.structured_replies,
            base_allocation: self.structured_replies && self.base_allocation,
        }
    }
}

/// The empty name selects the first (default) export.
fn find_export(exports: &[ExportInfo], name: &str) -> Option<usize> {
    let index = if name.is_empty() && !exports.is_empty() {
        0
    } else {
        exports.iter().position(|export| export.name == name)?
    };
    exports[index].is_offered().then_some(index)
}

fn error_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    proto::push_option_reply(out, option, reply_type, message.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::nbd::proto::{IHAVEOPT, OPTION_REPLY_MAGIC, be_u32, be_u64};

    fn exports() -> Vec<ExportInfo> {
        vec![ExportInfo::new(
            "vol0".into(),
            String::new(),
            1 << 20,
            TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA,
        )]
    }

    fn option(number: u32, data: &[u8]) -> Vec<u8> {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&number.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        data
    }

    /// Parses option replies into (option, type, data).
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(be_u64(&bytes[0..8]), OPTION_REPLY_MAGIC);
            let len = be_u32(&bytes[16..20]) as usize;
            out.push((
                be_u32(&bytes[8..12]),
                be_u32(&bytes[12..16]),
                bytes[20..20 + len].to_vec(),
            ));
            bytes = &bytes[20 + len..];
        }
        out
    }

    fn started() -> Negotiation {
        let mut greeting = Vec::new();
        let mut negotiation = Negotiation::start(&mut greeting);
        assert_eq!(greeting.len(), 18);
        let mut out = Vec::new();
        assert_eq!(
            negotiation.feed(&3u32.to_be_bytes(), &mut out, &exports()),
            (4, Step::NeedMore)
        );
        negotiation
    }

    #[test]
    fn go_sends_export_block_size_and_ack() {
        let mut negotiation = started();
        let input = option(opt::GO, &go_data("vol0", &[info::BLOCK_SIZE]));
        let mut out = Vec::new();
        let (consumed, step) = negotiation.feed(&input, &mut out, &exports());
        assert_eq!(consumed, input.len());
        assert_eq!(
            step,
            Step::Transmission(Agreement {
                export: 0,
                structured_replies: false,
                base_allocation: false
            })
        );
        let replies = replies(&out);
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0].1, rep::INFO);
        assert_eq!(be_u64(&replies[0].2[2..10]), 1 << 20);
        assert_eq!(replies[1].2.len(), 14);
        assert_eq!(be_u32(&replies[1].2[2..6]), BLOCK_SIZE_MIN);
        assert_eq!(replies[2].1, rep::ACK);
    }

    #[test]
    fn unknown_export_and_option_keep_the_session() {
        let mut negotiation = started();
        let mut input = option(opt::GO, &go_data("nope", &[]));
        input.extend(option(1000, b"junk"));
        input.extend(option(opt::SET_META_CONTEXT, &[]));
        let mut out = Vec::new();
        let (consumed, step) = negotiation.feed(&input, &mut out, &exports());
        assert_eq!((consumed, step), (input.len(), Step::NeedMore));
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            vec![rep::ERR_UNKNOWN, rep::ERR_UNSUP, rep::ERR_INVALID]
        );
    }

    #[test]
    fn meta_context_selection_needs_structured_replies() {
        let mut negotiation = started();
        let mut query = go_data("vol0", &[]);
        query.truncate(8); // name
        query.extend_from_slice(&1u32.to_be_bytes());
        query.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
        query.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        let mut input = option(opt::STRUCTURED_REPLY, &[]);
        input.extend(option(opt::SET_META_CONTEXT, &query));
        input.extend(option(opt::GO, &go_data("", &[])));
        let mut out = Vec::new();
        let (_, step) = negotiation.feed(&input, &mut out, &exports());
        assert_eq!(
            step,
            Step::Transmission(Agreement {
                export: 0,
                structured_replies: true,
                base_allocation: true
            })
        );
        let replies = replies(&out);
        assert_eq!(replies[1].1, rep::META_CONTEXT);
        assert_eq!(be_u32(&replies[1].2[0..4]), META_BASE_ALLOCATION_ID);
        // SEND_DF appears once structured replies are on.
        let flags = TransmissionFlags::from_bits_retain(proto::be_u16(&replies[3].2[10..12]));
        assert!(flags.contains(TransmissionFlags::SEND_DF));
    }

    #[test]
    fn hostile_input_closes_or_refuses() {
        let mut out = Vec::new();
        let mut negotiation = Negotiation::start(&mut out);
        let (_, step) = negotiation.feed(&0xffff_ffffu32.to_be_bytes(), &mut out, &exports());
        assert_eq!(
            step,
            Step::Close(NegotiationError::BadClientFlags(0xffff_ffff))
        );

        let mut negotiation = started();
        let (_, step) = negotiation.feed(&[0x55; 16], &mut out, &exports());
        assert_eq!(step, Step::Close(NegotiationError::BadOptionMagic));

        // An over-long option is skipped in pieces without buffering it, then refused.
        let mut negotiation = started();
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&opt::GO.to_be_bytes());
        header.extend_from_slice(&(OPTION_LENGTH_MAX + 10).to_be_bytes());
        let mut out = Vec::new();
        assert_eq!(
            negotiation.feed(&header, &mut out, &exports()),
            (16, Step::NeedMore)
        );
        let filler = vec![0u8; OPTION_LENGTH_MAX as usize];
        assert_eq!(
            negotiation.feed(&filler, &mut out, &exports()).0,
            filler.len()
        );
        assert!(out.is_empty());
        assert_eq!(negotiation.feed(&[0u8; 10], &mut out, &exports()).0, 10);
        assert_eq!(replies(&out)[0].1, rep::ERR_TOO_BIG);

        let mut negotiation = started();
        let input = option(opt::EXPORT_NAME, b"missing");
        let (_, step) = negotiation.feed(&input, &mut out, &exports());
        assert_eq!(
            step,
            Step::Close(NegotiationError::UnknownExportName("missing".into()))
        );
    }
}
