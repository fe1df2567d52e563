//! Hostile / malformed-client tests against the raw NBD protocol.
//!
//! Every test asserts the exact protocol outcome (error reply type, errno, or
//! disconnect), that a client connected during the hostile case (the
//! "bystander") is unaffected, and that a fresh well-behaved client still
//! works afterwards.

mod common;

use common::nbd;
use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;

const SIZE: u64 = 64 * MIB;

fn start() -> Server {
    Server::start(&["--size", "64M"])
}

/// A client that is connected (in transmission) before the hostile action and
/// must keep working after it.
struct Bystander {
    conn: NbdConn,
    offset: u64,
    data: Vec<u8>,
}

impl Bystander {
    fn new(srv: &Server, offset: u64, structured: bool) -> Bystander {
        let mut conn = NbdConn::connect_go(&srv.addr, &srv.export, structured);
        let data = Rng::new(offset ^ 0xb157).bytes(8192);
        conn.write_verify(offset, &data);
        Bystander { conn, offset, data }
    }

    fn check(mut self) {
        let back = self
            .conn
            .read(self.offset, self.data.len() as u32)
            .unwrap_or_else(|e| panic!("bystander READ failed with errno {e}"));
        assert_bytes(&back, &self.data, "bystander data");
        let more = Rng::new(self.offset ^ 0x5eed).bytes(4096);
        self.conn.write_verify(self.offset + 8192, &more);
        assert_eq!(self.conn.flush(), 0);
        self.conn.disconnect();
    }
}

/// Runs `hostile` with two bystanders (simple + structured) connected, then
/// checks the bystanders and a fresh client.
fn with_bystanders(srv: &mut Server, hostile: impl FnOnce(&Server)) {
    let b1 = Bystander::new(srv, 40 * MIB, false);
    let b2 = Bystander::new(srv, 41 * MIB, true);
    hostile(srv);
    srv.assert_alive();
    b1.check();
    b2.check();
    assert_healthy(&srv.addr, &srv.export, 42 * MIB, 0xfeed);
    srv.assert_alive();
}

/// Connects, reads the greeting, returns the raw stream.
fn raw_after_greeting(addr: &str) -> (TcpStream, u16) {
    let mut s = tcp_connect(addr);
    let flags = read_greeting(&mut s).expect("greeting");
    (s, flags)
}

fn assert_opt_reply_type(r: &OptReply, opt: u32, want: u32, what: &str) {
    assert_eq!(r.option, opt, "{what}: reply tagged with the wrong option");
    assert_eq!(
        r.rtype, want,
        "{what}: expected option reply type {want:#x}, got {:#x} (data {:?})",
        r.rtype, r.data
    );
}

/// Asserts a transmission-phase error reply with `errno`, in the form the
/// contract requires (simple reply without structured replies, an
/// NBD_REPLY_TYPE_ERROR chunk with them).
fn assert_cmd_err(r: &CmdReply, structured: bool, errno: u32, what: &str) {
    assert_eq!(
        r.error, errno,
        "{what}: expected errno {errno}, got {} ({r:?})",
        r.error
    );
    if structured {
        assert_eq!(
            r.error_chunk,
            Some(nbd::REPLY_TYPE_ERROR),
            "{what}: with structured replies the error must be an NBD_REPLY_TYPE_ERROR chunk ({r:?})"
        );
    } else {
        assert!(
            !r.structured,
            "{what}: structured reply sent without negotiation"
        );
    }
}

// ---------------------------------------------------------------------------
// Handshake phase
// ---------------------------------------------------------------------------

#[test]
fn garbage_instead_of_client_flags_disconnects() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        // After reading the greeting.
        let (mut s, _) = raw_after_greeting(&srv.addr);
        s.write_all(&Rng::new(1).bytes(64)).unwrap();
        assert_disconnected(&mut s, "64 random bytes as client flags");
        // Without even reading the greeting.
        let mut s = tcp_connect(&srv.addr);
        s.write_all(&Rng::new(2).bytes(64)).unwrap();
        assert_disconnected(&mut s, "64 random bytes before reading the greeting");
    });
}

#[test]
fn unknown_client_flags_disconnect() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        for flags in [
            nbd::FLAG_C_FIXED_NEWSTYLE | 0x8000_0000,
            nbd::FLAG_C_FIXED_NEWSTYLE | nbd::FLAG_C_NO_ZEROES | 0x4,
            0xffff_ffff,
        ] {
            let (mut s, _) = raw_after_greeting(&srv.addr);
            s.write_all(&flags.to_be_bytes()).unwrap();
            assert_disconnected(&mut s, &format!("client flags {flags:#x}"));
        }
    });
}

#[test]
fn bad_ihaveopt_magic_disconnects() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        let mut msg = Vec::new();
        msg.extend_from_slice(&0x4948_4156_454F_5055u64.to_be_bytes()); // IHAVEOPU
        msg.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        c.send_raw(&msg).unwrap();
        assert_disconnected(&mut c.stream, "option header with a bad IHAVEOPT magic");

        // Garbage as the very first option header.
        let mut c = NbdConn::connect(&srv.addr);
        c.send_raw(&Rng::new(3).bytes(64)).unwrap();
        assert_disconnected(&mut c.stream, "64 random bytes as an option header");

        // A valid option first, then a bad magic.
        let mut c = NbdConn::connect(&srv.addr);
        assert_eq!(c.opt_structured_reply().unwrap(), nbd::REP_ACK);
        c.send_raw(&[0xde; 16]).unwrap();
        assert_disconnected(&mut c.stream, "bad magic after a valid option");
    });
}

#[test]
fn unknown_option_is_unsupported_and_connection_survives() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        let r = c.option_simple(1000, &Rng::new(4).bytes(37)).unwrap();
        assert_opt_reply_type(&r, 1000, nbd::REP_ERR_UNSUP, "option 1000 with data");
        let r = c.option_simple(0x7fff_ffff, &[]).unwrap();
        assert_opt_reply_type(&r, 0x7fff_ffff, nbd::REP_ERR_UNSUP, "option 0x7fffffff");
        let info = c
            .opt_go(&srv.export, &[nbd::INFO_BLOCK_SIZE])
            .unwrap()
            .expect("GO after an unknown option");
        assert_eq!(info.size, SIZE);
        let data = Rng::new(5).bytes(4096);
        c.write_verify(0, &data);
        c.disconnect();
    });
}

#[test]
fn starttls_is_unsupported_and_connection_survives() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        let r = c.option_simple(nbd::OPT_STARTTLS, &[]).unwrap();
        assert_opt_reply_type(&r, nbd::OPT_STARTTLS, nbd::REP_ERR_UNSUP, "STARTTLS");
        c.opt_go(&srv.export, &[])
            .unwrap()
            .expect("GO after STARTTLS");
        c.write_verify(4096, &Rng::new(6).bytes(4096));
        c.disconnect();
    });
}

#[test]
fn oversized_option_is_too_big_and_connection_survives() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        for opt in [nbd::OPT_GO, nbd::OPT_INFO, nbd::OPT_SET_META_CONTEXT] {
            let junk = Rng::new(opt as u64).bytes(100 * 1024);
            let r = c.option_simple(opt, &junk).unwrap();
            assert_opt_reply_type(
                &r,
                opt,
                nbd::REP_ERR_TOO_BIG,
                &format!("option {opt} with 100 KiB of data"),
            );
        }
        let info = c
            .opt_go(&srv.export, &[nbd::INFO_BLOCK_SIZE])
            .unwrap()
            .expect("GO after TOO_BIG");
        assert_eq!(info.size, SIZE);
        c.write_verify(8192, &Rng::new(7).bytes(4096));
        c.disconnect();
    });
}

#[test]
fn go_and_info_with_unknown_export_and_connection_survives() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        for opt in [nbd::OPT_INFO, nbd::OPT_GO] {
            for name in ["no-such-export", "vol00", "VOL0"] {
                if name == srv.export {
                    continue;
                }
                let r = c.opt_info_or_go(opt, name, &[]).unwrap();
                assert_eq!(
                    r.as_ref().err(),
                    Some(&nbd::REP_ERR_UNKNOWN),
                    "option {opt} for unknown export {name:?}: got {r:?}"
                );
            }
        }
        // INFO for the real export works and does not end negotiation.
        let info = c
            .opt_info_or_go(nbd::OPT_INFO, &srv.export, &[nbd::INFO_BLOCK_SIZE])
            .unwrap()
            .expect("INFO for the real export");
        assert_eq!(info.size, SIZE);
        let info = c
            .opt_go(&srv.export, &[nbd::INFO_BLOCK_SIZE])
            .unwrap()
            .expect("GO for the real export");
        assert_eq!(info.size, SIZE);
        c.write_verify(12288, &Rng::new(8).bytes(4096));
        c.disconnect();
    });
}

#[test]
fn export_name_unknown_disconnects_known_works() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        c.send_option(nbd::OPT_EXPORT_NAME, b"no-such-export")
            .unwrap();
        assert_disconnected(&mut c.stream, "EXPORT_NAME with an unknown name");

        let mut c = NbdConn::connect(&srv.addr);
        let (size, tflags) = c.opt_export_name(&srv.export).unwrap();
        assert_eq!(size, SIZE);
        assert_ne!(
            tflags & nbd::TF_HAS_FLAGS,
            0,
            "HAS_FLAGS missing: {tflags:#x}"
        );
        c.write_verify(16384, &Rng::new(9).bytes(4096));
        c.disconnect();
    });
}

#[test]
fn meta_context_before_structured_reply_is_invalid() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        for opt in [nbd::OPT_LIST_META_CONTEXT, nbd::OPT_SET_META_CONTEXT] {
            let r = c
                .opt_meta_context(opt, &srv.export, &["base:allocation"])
                .unwrap();
            assert_eq!(
                r.as_ref().err(),
                Some(&nbd::REP_ERR_INVALID),
                "meta context option {opt} before STRUCTURED_REPLY: got {r:?}"
            );
        }
        // After STRUCTURED_REPLY both work.
        assert_eq!(c.opt_structured_reply().unwrap(), nbd::REP_ACK);
        let listed = c
            .opt_meta_context(nbd::OPT_LIST_META_CONTEXT, &srv.export, &[])
            .unwrap()
            .expect("LIST_META_CONTEXT after STRUCTURED_REPLY");
        assert!(
            listed.iter().any(|(_, n)| n == "base:allocation"),
            "LIST_META_CONTEXT did not list base:allocation: {listed:?}"
        );
        let set = c
            .opt_meta_context(nbd::OPT_SET_META_CONTEXT, &srv.export, &["base:allocation"])
            .unwrap()
            .expect("SET_META_CONTEXT after STRUCTURED_REPLY");
        assert_eq!(set.len(), 1, "{set:?}");
        assert_eq!(set[0].1, "base:allocation");
        c.meta_id = Some(set[0].0);
        c.opt_go(&srv.export, &[]).unwrap().expect("GO");
        let bs = c.block_status(0, 4096, 0);
        assert_eq!(bs.error, 0, "BLOCK_STATUS after negotiation: {bs:?}");
        assert!(!bs.extents.is_empty(), "no extents: {bs:?}");
        assert!(bs.extents.iter().all(|e| e.0 == set[0].0));
        c.disconnect();
    });
}

#[test]
fn list_returns_export_and_abort_ends_session() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        let names = c.opt_list().unwrap().expect("LIST");
        assert_eq!(names, vec![srv.export.clone()], "LIST result");
        c.send_option(nbd::OPT_ABORT, &[]).unwrap();
        assert_disconnected(&mut c.stream, "after NBD_OPT_ABORT");
    });
}

#[test]
fn malformed_go_payload_does_not_hurt_server() {
    // The contract does not fix the reply for inconsistent GO payloads; the
    // server may send an error reply or disconnect, but must survive.
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let payloads: Vec<Vec<u8>> = vec![
            vec![],                            // no name length at all
            vec![0, 0, 0, 200, b'v', b'o'],    // name length past the end
            vec![0, 0, 0, 0],                  // missing info count
            vec![0, 0, 0, 0, 0, 5, 0, 3],      // info count past the end
            vec![0xff, 0xff, 0xff, 0xff, 0x0], // huge name length
        ];
        for p in payloads {
            let mut c = NbdConn::connect(&srv.addr);
            c.send_option(nbd::OPT_GO, &p).unwrap();
            c.stream
                .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            match c.read_option_reply() {
                Ok(r) => assert!(
                    r.rtype & 0x8000_0000 != 0,
                    "malformed GO payload {p:?} was not rejected: {r:?}"
                ),
                // Disconnected: acceptable. Silence is not.
                Err(e) => assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "malformed GO payload {p:?}: server neither replied nor disconnected"
                ),
            }
        }
    });
}

#[test]
fn truncated_option_then_close_only_drops_that_client() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let mut c = NbdConn::connect(&srv.addr);
        let mut msg = Vec::new();
        msg.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
        msg.extend_from_slice(&1000u32.to_be_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        c.send_raw(&msg).unwrap();
        drop(c);
        // A half-sent option header.
        let mut c = NbdConn::connect(&srv.addr);
        c.send_raw(&nbd::IHAVEOPT.to_be_bytes()[..5]).unwrap();
        drop(c);
    });
}

// ---------------------------------------------------------------------------
// Transmission phase
// ---------------------------------------------------------------------------

#[test]
fn bad_request_magic_disconnects() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        for structured in [false, true] {
            let mut c = NbdConn::connect_go(&srv.addr, &srv.export, structured);
            let mut req = NbdConn::request_bytes(0, nbd::CMD_READ, 1, 0, 4096);
            req[0..4].copy_from_slice(&0x2560_9514u32.to_be_bytes());
            c.send_raw(&req).unwrap();
            assert_disconnected(&mut c.stream, "request with a bad magic");
        }
        let mut c = server_client(srv, false);
        c.send_raw(&Rng::new(10).bytes(64)).unwrap();
        assert_disconnected(&mut c.stream, "64 random bytes as a request");
    });
}

fn server_client(srv: &Server, structured: bool) -> NbdConn {
    NbdConn::connect_go(&srv.addr, &srv.export, structured)
}

#[test]
fn unknown_command_is_einval_and_connection_continues() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        for structured in [false, true] {
            let mut c = server_client(srv, structured);
            for cmd in [99u16, 8, 0xffff] {
                let r = c.command(0, cmd, 0, 4096, &[]).unwrap();
                assert_cmd_err(&r, structured, nbd::EINVAL, &format!("command type {cmd}"));
            }
            c.write_verify(20480, &Rng::new(11).bytes(4096));
            c.disconnect();
        }
    });
}

#[test]
fn oversized_requests_are_einval_and_write_payload_is_discarded() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        let max = nbd::MAX_REQUEST;
        for structured in [false, true] {
            let mut c = server_client(srv, structured);
            let r = c.command(0, nbd::CMD_READ, 0, max + 512, &[]).unwrap();
            assert_cmd_err(&r, structured, nbd::EINVAL, "READ of 32 MiB + 512");

            // The WRITE payload must be read and discarded; if it were not, the
            // next request would be parsed from the middle of the payload.
            let mut payload = vec![0u8; (max + 512) as usize];
            // Make the payload look like a stream of valid requests so a
            // server that fails to discard it would visibly misbehave.
            for (i, chunk) in payload.chunks_mut(28).enumerate() {
                let req = NbdConn::request_bytes(0, nbd::CMD_WRITE_ZEROES, i as u64, 0, 4096);
                let n = chunk.len();
                chunk.copy_from_slice(&req[..n]);
            }
            let r = c
                .command(0, nbd::CMD_WRITE, 0, max + 512, &payload)
                .unwrap();
            assert_cmd_err(&r, structured, nbd::EINVAL, "WRITE of 32 MiB + 512");
            drop(payload);

            // Exactly the maximum is fine.
            let data = Rng::new(12 + structured as u64).bytes(max as usize);
            c.write_verify(0, &data);
            c.write_verify(24576, &Rng::new(13).bytes(4096));
            c.disconnect();
        }
    });
}

#[test]
fn requests_past_the_end() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        for structured in [false, true] {
            let mut c = server_client(srv, structured);
            let cases: [(u64, u32); 4] = [
                (SIZE - 512, 1024),     // straddles the end
                (SIZE, 512),            // starts at the end
                (SIZE + 4096, 4096),    // entirely beyond
                (u64::MAX - 511, 1024), // offset + length overflows u64
            ];
            for (off, len) in cases {
                for cmd in [nbd::CMD_READ, nbd::CMD_CACHE] {
                    let r = c.command(0, cmd, off, len, &[]).unwrap();
                    assert_cmd_err(
                        &r,
                        structured,
                        nbd::EINVAL,
                        &format!("cmd {cmd} at {off}+{len}"),
                    );
                }
                if structured {
                    let r = c.command(0, nbd::CMD_BLOCK_STATUS, off, len, &[]).unwrap();
                    assert_cmd_err(
                        &r,
                        true,
                        nbd::EINVAL,
                        &format!("BLOCK_STATUS at {off}+{len}"),
                    );
                }
                let payload = Rng::new(off).bytes(len as usize);
                let r = c.command(0, nbd::CMD_WRITE, off, len, &payload).unwrap();
                assert_cmd_err(
                    &r,
                    structured,
                    nbd::ENOSPC,
                    &format!("WRITE at {off}+{len}"),
                );
                for cmd in [nbd::CMD_TRIM, nbd::CMD_WRITE_ZEROES] {
                    let r = c.command(0, cmd, off, len, &[]).unwrap();
                    assert_cmd_err(
                        &r,
                        structured,
                        nbd::ENOSPC,
                        &format!("cmd {cmd} at {off}+{len}"),
                    );
                }
            }
            // The last block is still usable, and was not touched.
            assert_zeros(&c.read(SIZE - 512, 512).unwrap(), "READ SIZE - 512, 512");
            c.write_verify(SIZE - 8192, &Rng::new(14).bytes(4096));
            c.disconnect();
        }
    });
}

#[test]
fn unaligned_requests_are_einval() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        for structured in [false, true] {
            let mut c = server_client(srv, structured);
            let cases: [(u64, u32); 3] = [(100, 512), (0, 100), (4096 + 1, 4095)];
            for (off, len) in cases {
                for cmd in [
                    nbd::CMD_READ,
                    nbd::CMD_CACHE,
                    nbd::CMD_TRIM,
                    nbd::CMD_WRITE_ZEROES,
                ] {
                    let r = c.command(0, cmd, off, len, &[]).unwrap();
                    assert_cmd_err(
                        &r,
                        structured,
                        nbd::EINVAL,
                        &format!("cmd {cmd} at {off}+{len}"),
                    );
                }
                // The WRITE payload must be consumed for the stream to stay in sync.
                let payload = vec![0x5a; len as usize];
                let r = c.command(0, nbd::CMD_WRITE, off, len, &payload).unwrap();
                assert_cmd_err(
                    &r,
                    structured,
                    nbd::EINVAL,
                    &format!("WRITE at {off}+{len}"),
                );
            }
            // Nothing was written by the rejected requests.
            assert_zeros(&c.read(0, 8192).unwrap(), "READ 0, 8192");
            c.write_verify(28672, &Rng::new(15).bytes(4096));
            c.disconnect();
        }
    });
}

#[test]
fn zero_length_requests_are_einval() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        for structured in [false, true] {
            let mut c = server_client(srv, structured);
            for cmd in [
                nbd::CMD_READ,
                nbd::CMD_WRITE,
                nbd::CMD_TRIM,
                nbd::CMD_WRITE_ZEROES,
            ] {
                let r = c.command(0, cmd, 4096, 0, &[]).unwrap();
                assert_cmd_err(
                    &r,
                    structured,
                    nbd::EINVAL,
                    &format!("zero-length cmd {cmd}"),
                );
            }
            c.write_verify(32768, &Rng::new(16).bytes(4096));
            c.disconnect();
        }
    });
}

#[test]
fn block_status_without_meta_context_is_einval() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        // No structured replies at all.
        let mut c = server_client(srv, false);
        let r = c.command(0, nbd::CMD_BLOCK_STATUS, 0, 4096, &[]).unwrap();
        assert_cmd_err(
            &r,
            false,
            nbd::EINVAL,
            "BLOCK_STATUS without structured replies",
        );
        c.write_verify(36864, &Rng::new(17).bytes(4096));
        c.disconnect();

        // Structured replies but no meta context selected.
        let mut c = NbdConn::connect(&srv.addr);
        assert_eq!(c.opt_structured_reply().unwrap(), nbd::REP_ACK);
        c.opt_go(&srv.export, &[]).unwrap().expect("GO");
        let r = c.command(0, nbd::CMD_BLOCK_STATUS, 0, 4096, &[]).unwrap();
        assert_cmd_err(&r, true, nbd::EINVAL, "BLOCK_STATUS without a meta context");
        c.write_verify(40960, &Rng::new(18).bytes(4096));
        c.disconnect();
    });
}

#[test]
fn half_written_payload_then_close_only_drops_that_client() {
    let mut srv = start();
    with_bystanders(&mut srv, |srv| {
        for structured in [false, true] {
            let mut c = server_client(srv, structured);
            let h = c.alloc_handle();
            let hdr = NbdConn::request_bytes(0, nbd::CMD_WRITE, h, MIB, 65536);
            c.send_raw(&hdr).unwrap();
            c.send_raw(&Rng::new(19).bytes(32768)).unwrap();
            let _ = c.stream.shutdown(Shutdown::Both);
            drop(c);
        }
        // Header only, cut in the middle.
        let mut c = server_client(srv, false);
        let hdr = NbdConn::request_bytes(0, nbd::CMD_READ, 7, 0, 4096);
        c.send_raw(&hdr[..13]).unwrap();
        drop(c);
    });
}

#[test]
fn disc_closes_the_connection() {
    let srv = start();
    for structured in [false, true] {
        let mut c = server_client(&srv, structured);
        c.write_verify(0, &Rng::new(20).bytes(4096));
        let h = c.alloc_handle();
        c.send_request(0, nbd::CMD_DISC, h, 0, 0, &[]).unwrap();
        // The server must not reply to DISC; it closes the connection.
        let mut buf = [0u8; 64];
        c.stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        match c.stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("server sent {n} bytes in response to NBD_CMD_DISC"),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "server did not close the connection after NBD_CMD_DISC"
            ),
        }
    }
    assert_healthy(&srv.addr, &srv.export, MIB, 21);
}

#[test]
fn pipelined_requests_are_all_answered() {
    let srv = start();
    let mut c = server_client(&srv, true);
    let n = 48u64;
    let mut expected: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut write_handles = Vec::new();
    for i in 0..n {
        let data = Rng::new(100 + i).bytes(4096);
        let h = 0x1000 + i;
        c.send_request(0, nbd::CMD_WRITE, h, i * 8192, 4096, &data)
            .unwrap();
        write_handles.push(h);
        expected.insert(i, data);
    }
    // Collect the write replies (any order).
    let mut pending: std::collections::HashSet<u64> = write_handles.iter().copied().collect();
    while !pending.is_empty() {
        match c.read_message().expect("write reply") {
            Message::Simple { handle, error } => {
                assert_eq!(error, 0, "pipelined WRITE {handle:#x} failed");
                assert!(pending.remove(&handle), "unexpected handle {handle:#x}");
            }
            Message::Chunk {
                handle,
                flags,
                rtype,
                payload,
            } => {
                assert_eq!(
                    rtype,
                    nbd::REPLY_TYPE_NONE,
                    "WRITE chunk {rtype:#x} {payload:?}"
                );
                assert_ne!(flags & nbd::REPLY_FLAG_DONE, 0);
                assert!(pending.remove(&handle), "unexpected handle {handle:#x}");
            }
        }
    }
    // Now pipeline the reads.
    for i in 0..n {
        c.send_request(0, nbd::CMD_READ, 0x2000 + i, i * 8192, 4096, &[])
            .unwrap();
    }
    let mut got: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut done = 0;
    while done < n {
        match c.read_message().expect("read reply") {
            Message::Simple { handle, error } => {
                panic!("simple reply (error {error}) to structured READ {handle:#x}")
            }
            Message::Chunk {
                handle,
                flags,
                rtype,
                payload,
            } => {
                let i = handle - 0x2000;
                assert!(i < n, "unexpected handle {handle:#x}");
                let buf = got.entry(i).or_insert_with(|| vec![0xee; 4096]);
                match rtype {
                    nbd::REPLY_TYPE_OFFSET_DATA => {
                        let off = (be64_at(&payload) - i * 8192) as usize;
                        buf[off..off + payload.len() - 8].copy_from_slice(&payload[8..]);
                    }
                    nbd::REPLY_TYPE_OFFSET_HOLE => {
                        let off = (be64_at(&payload) - i * 8192) as usize;
                        let len = be32_at(&payload[8..]) as usize;
                        buf[off..off + len].fill(0);
                    }
                    nbd::REPLY_TYPE_NONE => {}
                    t => panic!("unexpected chunk type {t:#x} for READ"),
                }
                if flags & nbd::REPLY_FLAG_DONE != 0 {
                    done += 1;
                }
            }
        }
    }
    for i in 0..n {
        assert!(
            got[&i] == expected[&i],
            "pipelined READ {i} returned wrong data"
        );
    }
    c.disconnect();
}

// ---------------------------------------------------------------------------
// Many connections
// ---------------------------------------------------------------------------

#[test]
fn fifty_concurrent_clients() {
    let srv = start();
    // All 50 connected (in transmission) at the same time.
    let conns: Vec<NbdConn> = (0..50)
        .map(|i| NbdConn::connect_go(&srv.addr, &srv.export, i % 2 == 1))
        .collect();
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            thread::spawn(move || {
                let base = i as u64 * 256 * KIB;
                let mut rng = Rng::new(1000 + i as u64);
                let mut last = Vec::new();
                for round in 0..20u64 {
                    let len = 512 * (1 + rng.below(16)) as usize;
                    let off = base + (round % 8) * 16 * KIB;
                    let data = rng.bytes(len);
                    c.write_verify(off, &data);
                    last.push((off, data));
                }
                assert_eq!(c.flush(), 0);
                (c, last)
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.join().expect("client thread panicked"));
    }
    // Cross-check from a single fresh client: the last write to each offset wins.
    let mut fresh = server_client(&srv, false);
    for (_, writes) in &results {
        let mut last_at: HashMap<u64, &Vec<u8>> = HashMap::new();
        for (off, data) in writes {
            last_at.insert(*off, data);
        }
        for (off, data) in last_at {
            let back = fresh.read(off, data.len() as u32).unwrap();
            assert!(&back == data, "data at {off} not as last written");
        }
    }
    fresh.disconnect();
    for (c, _) in results {
        c.disconnect();
    }
}

#[test]
fn idle_connections_do_not_block_others() {
    let mut srv = start();
    let mut idle: Vec<TcpStream> = Vec::new();
    // Connected but never reading or sending anything.
    for _ in 0..100 {
        idle.push(tcp_connect(&srv.addr));
    }
    // Read the greeting, then go silent.
    for _ in 0..20 {
        let (s, _) = raw_after_greeting(&srv.addr);
        idle.push(s);
    }
    // Sent client flags and half an option header, then silent.
    let mut half: Vec<NbdConn> = Vec::new();
    for _ in 0..20 {
        let mut c = NbdConn::connect(&srv.addr);
        c.send_raw(&nbd::IHAVEOPT.to_be_bytes()).unwrap();
        half.push(c);
    }
    // In transmission with a half-sent request header.
    for _ in 0..10 {
        let mut c = server_client(&srv, false);
        c.send_raw(&NbdConn::request_bytes(0, nbd::CMD_READ, 1, 0, 4096)[..20])
            .unwrap();
        half.push(c);
    }
    // Well-behaved clients, sequential and parallel, still work.
    assert_healthy(&srv.addr, &srv.export, 0, 30);
    let addr = srv.addr.clone();
    let export = srv.export.clone();
    let ts: Vec<_> = (0..4u64)
        .map(|i| {
            let (a, e) = (addr.clone(), export.clone());
            thread::spawn(move || assert_healthy(&a, &e, (1 + i) * MIB, 31 + i))
        })
        .collect();
    for t in ts {
        t.join().expect("healthy client panicked");
    }
    srv.assert_alive();
    drop(idle);
    drop(half);
    assert_healthy(&srv.addr, &srv.export, 8 * MIB, 40);
}

// ---------------------------------------------------------------------------
// Negotiated parameters
// ---------------------------------------------------------------------------

#[test]
fn transmission_flags_and_block_sizes() {
    let srv = start();
    let always = nbd::TF_HAS_FLAGS
        | nbd::TF_SEND_FLUSH
        | nbd::TF_SEND_FUA
        | nbd::TF_SEND_TRIM
        | nbd::TF_SEND_WRITE_ZEROES
        | nbd::TF_CAN_MULTI_CONN
        | nbd::TF_SEND_CACHE
        | nbd::TF_SEND_FAST_ZERO;
    for structured in [false, true] {
        let c = server_client(&srv, structured);
        let tf = c.info.tflags;
        assert_eq!(
            tf & always,
            always,
            "structured={structured}: missing transmission flags in {tf:#06x}"
        );
        assert_eq!(tf & nbd::TF_READ_ONLY, 0, "READ_ONLY set: {tf:#06x}");
        assert_eq!(
            tf & nbd::TF_SEND_DF != 0,
            structured,
            "SEND_DF must be set exactly when structured replies are negotiated \
             (structured={structured}, flags {tf:#06x})"
        );
        assert_eq!(c.info.size, SIZE);
        assert_eq!(
            c.info.block_size,
            Some((512, 4096, nbd::MAX_REQUEST)),
            "NBD_INFO_BLOCK_SIZE (min, preferred, max)"
        );
        c.disconnect();
    }
    // EXPORT_NAME (no info requests possible): flags still advertised.
    let mut c = NbdConn::connect(&srv.addr);
    let (size, tf) = c.opt_export_name(&srv.export).unwrap();
    assert_eq!(size, SIZE);
    assert_eq!(tf & always, always, "EXPORT_NAME flags {tf:#06x}");
    assert_eq!(
        tf & nbd::TF_SEND_DF,
        0,
        "SEND_DF without structured replies"
    );
    c.disconnect();
    // INFO reports the same as GO.
    let mut c = NbdConn::connect(&srv.addr);
    let info = c
        .opt_info_or_go(nbd::OPT_INFO, &srv.export, &[nbd::INFO_BLOCK_SIZE])
        .unwrap()
        .expect("INFO");
    assert_eq!(info.size, SIZE);
    assert_eq!(info.block_size, Some((512, 4096, nbd::MAX_REQUEST)));
    c.disconnect();
}

#[test]
fn command_flags_are_accepted() {
    let srv = start();
    for structured in [false, true] {
        let mut c = server_client(&srv, structured);
        let data = Rng::new(50).bytes(8192);
        assert_eq!(c.write(0, &data, nbd::CMD_FLAG_FUA), 0, "WRITE|FUA");
        assert_bytes(&c.read(0, 8192).unwrap(), &data, "after WRITE|FUA");
        assert_eq!(
            c.simple_cmd(nbd::CMD_FLAG_FUA, nbd::CMD_TRIM, 0, 4096),
            0,
            "TRIM|FUA"
        );
        assert_eq!(
            c.write_zeroes(4096, 4096, nbd::CMD_FLAG_FUA | nbd::CMD_FLAG_NO_HOLE),
            0,
            "WRITE_ZEROES|FUA|NO_HOLE"
        );
        assert_eq!(
            c.write_zeroes(8192, 8192, nbd::CMD_FLAG_FAST_ZERO),
            0,
            "WRITE_ZEROES|FAST_ZERO"
        );
        assert_zeros(&c.read(4096, 12288).unwrap(), "zeroed range");
        assert_eq!(c.simple_cmd(nbd::CMD_FLAG_FUA, nbd::CMD_FLUSH, 0, 0), 0);
        assert_eq!(c.cache(0, 65536), 0, "CACHE");
        if structured {
            let r = c
                .command(nbd::CMD_FLAG_DF, nbd::CMD_READ, 0, 65536, &[])
                .unwrap();
            assert_eq!(r.error, 0, "READ|DF: {r:?}");
            assert_eq!(
                r.content_chunks, 1,
                "READ|DF must carry exactly one content chunk: {} chunks",
                r.content_chunks
            );
            let bs = c.block_status(0, 65536, nbd::CMD_FLAG_REQ_ONE);
            assert_eq!(bs.error, 0, "BLOCK_STATUS|REQ_ONE: {bs:?}");
            assert_eq!(bs.extents.len(), 1, "REQ_ONE extents: {bs:?}");
        }
        c.disconnect();
    }
}
