//! Feeds arbitrary client bytes, split at arbitrary points, through the NBD negotiation and then through
//! request decoding and validation: the two parsers that see untrusted input. Checks that nothing
//! panics, that no more bytes are consumed than given, and that every executed request is inside the
//! export and aligned.
#![no_main]

use ferroblock::frontend::nbd::negotiation::{ExportInfo, Negotiation, Step};
use ferroblock::frontend::nbd::proto::{self, REQUEST_HEADER_LEN, TransmissionFlags};
use ferroblock::frontend::nbd::request::{Decision, SessionLimits, validate};
use ferroblock::volume::IoKind;
use libfuzzer_sys::fuzz_target;

const EXPORT_SIZE: u64 = 1 << 30;

fuzz_target!(|data: &[u8]| {
    let Some((&split_seed, input)) = data.split_first() else { return };
    let exports = [ExportInfo::new(
        "vol0".into(),
        String::new(),
        EXPORT_SIZE,
        TransmissionFlags::SEND_FLUSH,
    )];
    let mut out = Vec::new();
    let mut negotiation = Negotiation::start(&mut out);
    // Deliver the bytes in chunks whose size derives from the first byte, as a socket might.
    let chunk = usize::from(split_seed % 37) + 1;
    let mut pending: Vec<u8> = Vec::new();
    let mut position = 0;
    let mut agreement = None;
    while position < input.len() && agreement.is_none() {
        let end = (position + chunk).min(input.len());
        pending.extend_from_slice(&input[position..end]);
        position = end;
        let (consumed, step) = negotiation.feed(&pending, &mut out, &exports);
        assert!(consumed <= pending.len());
        pending.drain(..consumed);
        match step {
            Step::NeedMore => {}
            Step::Transmission(agreed) => agreement = Some(agreed),
            Step::Close(_) => return,
        }
        // Replies are bounded by what the client sent (no amplification beyond a small factor).
        assert!(out.len() <= 18 + 64 * (position + 1));
    }
    let Some(agreement) = agreement else { return };
    assert_eq!(agreement.export, 0);
    pending.extend_from_slice(&input[position..]);
    let limits = SessionLimits {
        export_size_bytes: EXPORT_SIZE,
        structured_replies: agreement.structured_replies,
        base_allocation: agreement.base_allocation,
    };
    for header in pending.chunks_exact(REQUEST_HEADER_LEN) {
        let Ok(header) = proto::decode_request(header.try_into().expect("chunk size")) else { return };
        if let Decision::Execute(request) = validate(&header, &limits) {
            assert!(request.offset + u64::from(request.length) <= EXPORT_SIZE);
            if request.kind != IoKind::Flush {
                assert!(request.length > 0);
                assert_eq!(request.offset % 512, 0);
            }
            if matches!(request.kind, IoKind::Read | IoKind::Write) {
                assert!(request.length <= proto::REQUEST_LENGTH_MAX);
                assert_eq!(request.length % 512, 0);
            }
        }
    }
});
