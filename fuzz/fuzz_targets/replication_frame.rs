//! Feeds arbitrary peer bytes, split at arbitrary points, to the two parsers of a replication connection:
//! the frame decoder and the handshake (acceptor and initiator). Checks that nothing panics, that the
//! decoder never buffers more than it was given, that every decoded frame re-encodes to exactly the bytes
//! it came from (one encoding per frame) and decodes back to itself, and that no garbage authenticates.
#![no_main]

use crc32c::crc32c;
use ferroblock::replication::auth::{Handshake, Progress};
use ferroblock::replication::wire::{FrameDecoder, HEADER_LEN, encode};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzzing shared secret, 32 bytes!";

fuzz_target!(|data: &[u8]| {
    let Some((&split_seed, input)) = data.split_first() else {
        return;
    };
    // Deliver the bytes in chunks whose size derives from the first byte, as a socket might.
    let chunk = usize::from(split_seed % 61) + 1;
    // Half the time, fix the checksums up so that the fuzzer reaches the payload parsers: it could not
    // guess a crc32c on its own.
    let mut resealed;
    let input = if split_seed & 0x80 != 0 {
        resealed = input.to_vec();
        reseal_all(&mut resealed);
        &resealed[..]
    } else {
        input
    };

    let mut decoder = FrameDecoder::new();
    let mut reencoded = Vec::new();
    let mut pushed = 0;
    'stream: for piece in input.chunks(chunk) {
        decoder.push(piece);
        pushed += piece.len();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let start = reencoded.len();
                    encode(frame.volume, frame.epoch, &frame.message, &mut reencoded);
                    let mut again = FrameDecoder::new();
                    again.push(&reencoded[start..]);
                    assert_eq!(again.next_frame(), Ok(Some(frame)));
                    assert_eq!(again.buffered_len(), 0);
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(decoder.is_poisoned());
                    break 'stream;
                }
            }
        }
        assert!(decoder.buffered_len() + reencoded.len() <= pushed);
    }
    assert!(
        input.starts_with(&reencoded),
        "decoded frames must re-encode to the bytes they came from"
    );

    // The same bytes as a handshake, to both sides. Without the secret nothing may authenticate.
    let mut acceptor = Handshake::acceptor(SECRET, "acceptor", [0xa5; 32]);
    let (mut initiator, _challenge) = Handshake::initiator(SECRET, "initiator", [0x5a; 32]);
    for side in [&mut acceptor, &mut initiator] {
        for piece in input.chunks(chunk) {
            match side.on_bytes(piece) {
                Ok(Progress::Continue { .. }) => {}
                Ok(Progress::Authenticated { .. }) => panic!("garbage authenticated"),
                Err(_) => break,
            }
        }
    }
});

/// Writes the correct crc32c into every frame the input holds, following the payload lengths.
fn reseal_all(stream: &mut [u8]) {
    let mut start = 0;
    while let Some(header) = stream.get(start..start + HEADER_LEN) {
        let mut length = [0; 4];
        length.copy_from_slice(&header[24..28]);
        let Some(end) = (start + HEADER_LEN).checked_add(u32::from_le_bytes(length) as usize)
        else {
            return;
        };
        if end > stream.len() {
            return;
        }
        stream[start + 28..start + HEADER_LEN].fill(0);
        let crc = crc32c(&stream[start..end]);
        stream[start + 28..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        start = end;
    }
}
