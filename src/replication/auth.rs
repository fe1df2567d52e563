//! The handshake that opens every replication connection: both peers prove, without sending it, that they
//! know the cluster's shared secret, before a single `Message` is decoded.
//!
//! Owns: the handshake frame format, the HMAC-SHA256 challenge-response and its checks, as a sans-IO
//! state machine fed bytes (`Handshake::on_bytes`) that says what to send.
//! Must never: send or log the secret, accept a peer whose MAC did not verify (in constant time), let a
//! MAC made for one role or one session pass for another, read a length from the peer without bounding
//! it, or pass on bytes that follow the handshake before the handshake succeeded.
//!
//! # Exchange
//! ```text
//!   initiator (connects)                                   acceptor (listens)
//!   ── Challenge(node_I, nonce_I, mac = 0) ─────────────────►
//!   ◄──────────────── Response(node_A, nonce_A, mac_A) ─────  mac_A = HMAC(secret, "…acceptor response" ‖ T)
//!   checks mac_A: acceptor authenticated
//!   ── Confirm(node_I, nonce_I, mac_I) ─────────────────────►  mac_I = HMAC(secret, "…initiator confirm" ‖ T)
//!   (may send frames right behind it)                      checks mac_I: initiator authenticated
//!
//!   T = len(node_I) ‖ node_I ‖ len(node_A) ‖ node_A ‖ nonce_I ‖ nonce_A
//! ```
//! Each side's MAC covers a nonce it did not choose, fresh from the verifier's `getrandom`, so a recorded
//! MAC is worthless in a later session (replay). The two MACs carry different labels, so that a MAC
//! from one role never verifies as the other (reflection); a peer that claims our own node name, or
//! echoes our nonce, is refused too. The transcript `T` binds both node names, so the authenticated
//! peer name is the one the MAC covers.
//!
//! What this does not give: the frames after the handshake are protected by crc32c against corruption,
//! not by a MAC against an attacker who can inject into the TCP stream; that needs a session key (or
//! TLS) and is left for later.
//!
//! # Frame (136 bytes, fixed)
//! | offset | size | field                                                  |
//! |-------:|-----:|--------------------------------------------------------|
//! |      0 |    4 | magic `b"FBAU"`                                        |
//! |      4 |    1 | version (= 1)                                          |
//! |      5 |    1 | step: 1 Challenge, 2 Response, 3 Confirm               |
//! |      6 |    1 | node name length, 1..=`NODE_NAME_MAX` (64)             |
//! |      7 |    1 | reserved, zero                                         |
//! |      8 |   64 | node name (UTF-8), zero-padded                         |
//! |     72 |   32 | nonce of the sender                                    |
//! |    104 |   32 | MAC (zero in a Challenge)                              |

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::wire::NODE_NAME_MAX;

/// Size of a nonce and of a MAC.
pub const NONCE_LEN: usize = 32;
pub type Nonce = [u8; NONCE_LEN];
const MAC_LEN: usize = 32;
/// Size of every handshake frame.
pub const HANDSHAKE_FRAME_LEN: usize = 8 + NODE_NAME_MAX + NONCE_LEN + MAC_LEN;
/// First bytes of a handshake frame.
pub const HANDSHAKE_MAGIC: [u8; 4] = *b"FBAU";
pub const HANDSHAKE_VERSION: u8 = 1;
/// Shortest shared secret accepted; the configuration must refuse shorter ones with a clear error.
pub const SECRET_MIN_LEN: usize = 16;

const NODE_OFFSET: usize = 8;
const NONCE_OFFSET: usize = NODE_OFFSET + NODE_NAME_MAX;
const MAC_OFFSET: usize = NONCE_OFFSET + NONCE_LEN;

/// Domain separation: the role (and protocol) a MAC was made for.
const ACCEPTOR_LABEL: &[u8] = b"ferroblock replication auth v1: acceptor response";
const INITIATOR_LABEL: &[u8] = b"ferroblock replication auth v1: initiator confirm";

type HmacSha256 = Hmac<Sha256>;

/// The step byte of a handshake frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    Challenge = 1,
    Response = 2,
    Confirm = 3,
}

/// Why a handshake failed. The connection must be closed; nothing it carries may be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("bad handshake magic {found:02x?}: not a ferroblock replication peer")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported handshake version {found} (this build speaks {HANDSHAKE_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("expected handshake step {expected:?}, got step byte {found}")]
    UnexpectedStep { expected: Step, found: u8 },
    #[error("peer node name of {length} bytes (must be 1..={NODE_NAME_MAX})")]
    NodeNameLength { length: usize },
    #[error("peer node name is not UTF-8")]
    NodeNameNotUtf8,
    #[error("non-zero reserved or padding bytes in a handshake frame")]
    NonZeroPadding,
    #[error("peer claims our own node name {node:?} (reflected connection?)")]
    PeerIsSelf { node: String },
    #[error("peer echoed our nonce (reflected connection?)")]
    NonceReflected,
    #[error("peer's confirm does not match its challenge (node or nonce changed)")]
    TranscriptMismatch,
    #[error(
        "peer's {step:?} MAC does not verify: it does not know the shared secret, or replayed or reflected a MAC"
    )]
    BadMac { step: Step },
    #[error("peer sent {count} bytes it could not have sent yet in the handshake")]
    UnexpectedBytes { count: usize },
    #[error(
        "connection closed mid-handshake ({received} of {HANDSHAKE_FRAME_LEN} bytes of the {expected:?})"
    )]
    Truncated { expected: Step, received: usize },
    #[error(
        "the handshake is over (succeeded or refused); bytes go elsewhere or the connection is closed"
    )]
    Finished,
    #[error("no randomness for a nonce: {0}")]
    Entropy(getrandom::Error),
}

/// A fresh random nonce, for a real connection (tests inject fixed ones).
pub fn fresh_nonce() -> Result<Nonce, AuthError> {
    let mut nonce = [0; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(AuthError::Entropy)?;
    Ok(nonce)
}

/// What to do after `on_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Send `send` (may be empty) and feed the next bytes received.
    Continue { send: Vec<u8> },
    /// The peer is authenticated as `peer_node`. Send `send` (may be empty); `leftover_bytes` were received
    /// after the handshake and belong to the frame decoder.
    Authenticated {
        send: Vec<u8>,
        peer_node: String,
        leftover_bytes: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Initiator: challenge sent, waiting for the acceptor's response.
    AwaitResponse,
    /// Acceptor: waiting for the initiator's challenge.
    AwaitChallenge,
    /// Acceptor: response sent, waiting for the initiator's confirm.
    AwaitConfirm,
    /// Succeeded or refused.
    Done,
}

/// One side of the handshake on one connection.
pub struct Handshake {
    /// Keyed once; cloned for each MAC, so the raw secret is not kept.
    key: HmacSha256,
    my_node: String,
    my_nonce: Nonce,
    /// The peer's name and nonce, once its first frame arrived.
    peer: Option<(String, Nonce)>,
    state: State,
    /// The frame being received; never more than one frame.
    received: Vec<u8>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the key nor the nonces: nothing secret goes to a log.
        f.debug_struct("Handshake")
            .field("my_node", &self.my_node)
            .field("state", &self.state)
            .field("received", &self.received.len())
            .finish_non_exhaustive()
    }
}

/// A frame as read, after the checks that need no key.
struct ParsedFrame {
    step: u8,
    node: String,
    nonce: Nonce,
    mac: [u8; MAC_LEN],
}

fn parse_frame(frame: &[u8; HANDSHAKE_FRAME_LEN]) -> Result<ParsedFrame, AuthError> {
    let mut magic = [0; 4];
    magic.copy_from_slice(&frame[0..4]);
    if magic != HANDSHAKE_MAGIC {
        return Err(AuthError::BadMagic { found: magic });
    }
    if frame[4] != HANDSHAKE_VERSION {
        return Err(AuthError::UnsupportedVersion { found: frame[4] });
    }
    let node_len = usize::from(frame[6]);
    if node_len == 0 || node_len > NODE_NAME_MAX {
        return Err(AuthError::NodeNameLength { length: node_len });
    }
    let node_field = &frame[NODE_OFFSET..NONCE_OFFSET];
    // One encoding per frame: reserved byte and padding must be zero.
    if frame[7] != 0 || node_field[node_len..].iter().any(|&byte| byte != 0) {
        return Err(AuthError::NonZeroPadding);
    }
    let node =
        std::str::from_utf8(&node_field[..node_len]).map_err(|_| AuthError::NodeNameNotUtf8)?;
    let mut nonce = [0; NONCE_LEN];
    nonce.copy_from_slice(&frame[NONCE_OFFSET..MAC_OFFSET]);
    let mut mac = [0; MAC_LEN];
    mac.copy_from_slice(&frame[MAC_OFFSET..]);
    Ok(ParsedFrame {
        step: frame[5],
        node: node.to_owned(),
        nonce,
        mac,
    })
}

fn build_frame(step: Step, node: &str, nonce: &Nonce, mac: &[u8; MAC_LEN]) -> Vec<u8> {
    assert!(
        !node.is_empty() && node.len() <= NODE_NAME_MAX,
        "node name checked by the constructor"
    );
    let mut frame = vec![0; HANDSHAKE_FRAME_LEN];
    frame[0..4].copy_from_slice(&HANDSHAKE_MAGIC);
    frame[4] = HANDSHAKE_VERSION;
    frame[5] = step as u8;
    frame[6] = node.len() as u8;
    frame[NODE_OFFSET..NODE_OFFSET + node.len()].copy_from_slice(node.as_bytes());
    frame[NONCE_OFFSET..MAC_OFFSET].copy_from_slice(nonce);
    frame[MAC_OFFSET..].copy_from_slice(mac);
    frame
}

impl Handshake {
    fn new(secret: &[u8], my_node: &str, nonce: Nonce, state: State) -> Handshake {
        assert!(
            secret.len() >= SECRET_MIN_LEN,
            "replication secret shorter than {SECRET_MIN_LEN} bytes (the configuration must refuse it)"
        );
        assert!(
            !my_node.is_empty() && my_node.len() <= NODE_NAME_MAX,
            "node name must be 1..={NODE_NAME_MAX} bytes (the configuration must refuse others)"
        );
        let key = match HmacSha256::new_from_slice(secret) {
            Ok(key) => key,
            // HMAC takes keys of any length; this cannot happen.
            Err(_) => unreachable!("HMAC-SHA256 accepts keys of every length"),
        };
        Handshake {
            key,
            my_node: my_node.to_owned(),
            my_nonce: nonce,
            peer: None,
            state,
            received: Vec::with_capacity(HANDSHAKE_FRAME_LEN),
        }
    }

    /// The connecting side. Returns the state machine and the challenge to send first.
    ///
    /// # Panics
    /// If `secret` is shorter than `SECRET_MIN_LEN` or `my_node` is not 1..=`NODE_NAME_MAX` bytes: both
    /// come from our configuration, which must have refused them.
    pub fn initiator(secret: &[u8], my_node: &str, nonce: Nonce) -> (Handshake, Vec<u8>) {
        let handshake = Handshake::new(secret, my_node, nonce, State::AwaitResponse);
        let challenge = build_frame(Step::Challenge, my_node, &nonce, &[0; MAC_LEN]);
        (handshake, challenge)
    }

    /// The listening side; it speaks only after the initiator's challenge.
    ///
    /// # Panics
    /// As `initiator`.
    pub fn acceptor(secret: &[u8], my_node: &str, nonce: Nonce) -> Handshake {
        Handshake::new(secret, my_node, nonce, State::AwaitChallenge)
    }

    /// Feeds bytes received from the peer. On `Err` the connection must be closed (log the reason).
    pub fn on_bytes(&mut self, bytes: &[u8]) -> Result<Progress, AuthError> {
        let result = self.advance(bytes);
        if result.is_err() {
            self.state = State::Done;
            self.received = Vec::new();
        }
        result
    }

    /// The reason to log when the peer closes the connection before the handshake completed.
    pub fn on_closed(&self) -> AuthError {
        match self.state {
            State::AwaitResponse => AuthError::Truncated {
                expected: Step::Response,
                received: self.received.len(),
            },
            State::AwaitChallenge => AuthError::Truncated {
                expected: Step::Challenge,
                received: self.received.len(),
            },
            State::AwaitConfirm => AuthError::Truncated {
                expected: Step::Confirm,
                received: self.received.len(),
            },
            State::Done => AuthError::Finished,
        }
    }

    fn advance(&mut self, bytes: &[u8]) -> Result<Progress, AuthError> {
        if self.state == State::Done {
            return Err(AuthError::Finished);
        }
        let wanted = HANDSHAKE_FRAME_LEN - self.received.len();
        let (now, rest) = bytes.split_at(wanted.min(bytes.len()));
        self.received.extend_from_slice(now);
        let Some(frame) = self.received.first_chunk::<HANDSHAKE_FRAME_LEN>() else {
            return Ok(Progress::Continue { send: Vec::new() });
        };
        let frame = parse_frame(frame)?;
        self.received.clear();
        match self.state {
            State::AwaitChallenge => {
                // An honest initiator cannot send anything more before it has our nonce.
                if !rest.is_empty() {
                    return Err(AuthError::UnexpectedBytes { count: rest.len() });
                }
                let send = self.on_challenge(frame)?;
                self.state = State::AwaitConfirm;
                Ok(Progress::Continue { send })
            }
            State::AwaitResponse => {
                // The acceptor speaks again only after our confirm.
                if !rest.is_empty() {
                    return Err(AuthError::UnexpectedBytes { count: rest.len() });
                }
                let (send, peer_node) = self.on_response(frame)?;
                self.state = State::Done;
                Ok(Progress::Authenticated {
                    send,
                    peer_node,
                    leftover_bytes: Vec::new(),
                })
            }
            State::AwaitConfirm => {
                let peer_node = self.on_confirm(frame)?;
                self.state = State::Done;
                // The initiator may pipeline its first frames behind the confirm.
                Ok(Progress::Authenticated {
                    send: Vec::new(),
                    peer_node,
                    leftover_bytes: rest.to_vec(),
                })
            }
            State::Done => Err(AuthError::Finished),
        }
    }

    /// Checks that the peer's first frame is of `expected` step and not a reflection of our own.
    fn check_peer_frame(&self, frame: &ParsedFrame, expected: Step) -> Result<(), AuthError> {
        if frame.step != expected as u8 {
            return Err(AuthError::UnexpectedStep {
                expected,
                found: frame.step,
            });
        }
        if frame.node == self.my_node {
            return Err(AuthError::PeerIsSelf {
                node: frame.node.clone(),
            });
        }
        if frame.nonce == self.my_nonce {
            return Err(AuthError::NonceReflected);
        }
        Ok(())
    }

    /// The MAC over the transcript, for the role named by `label`.
    fn transcript_mac(
        &self,
        label: &[u8],
        initiator: (&str, &Nonce),
        acceptor: (&str, &Nonce),
    ) -> HmacSha256 {
        let mut mac = self.key.clone();
        mac.update(label);
        // Length-prefixed names: no two transcripts share an encoding.
        for name in [initiator.0, acceptor.0] {
            mac.update(&[name.len() as u8]);
            mac.update(name.as_bytes());
        }
        mac.update(initiator.1);
        mac.update(acceptor.1);
        mac
    }

    /// Acceptor: a challenge arrived; answer with our nonce and our proof over both nonces.
    fn on_challenge(&mut self, frame: ParsedFrame) -> Result<Vec<u8>, AuthError> {
        self.check_peer_frame(&frame, Step::Challenge)?;
        if frame.mac != [0; MAC_LEN] {
            return Err(AuthError::NonZeroPadding);
        }
        let proof = self
            .transcript_mac(
                ACCEPTOR_LABEL,
                (&frame.node, &frame.nonce),
                (&self.my_node, &self.my_nonce),
            )
            .finalize()
            .into_bytes();
        let mut mac = [0; MAC_LEN];
        mac.copy_from_slice(&proof);
        let response = build_frame(Step::Response, &self.my_node, &self.my_nonce, &mac);
        self.peer = Some((frame.node, frame.nonce));
        Ok(response)
    }

    /// Initiator: the acceptor's response arrived; verify it, then prove ourselves.
    fn on_response(&mut self, frame: ParsedFrame) -> Result<(Vec<u8>, String), AuthError> {
        self.check_peer_frame(&frame, Step::Response)?;
        let me = (self.my_node.as_str(), &self.my_nonce);
        self.transcript_mac(ACCEPTOR_LABEL, me, (&frame.node, &frame.nonce))
            .verify_slice(&frame.mac)
            .map_err(|_| AuthError::BadMac {
                step: Step::Response,
            })?;
        let proof = self
            .transcript_mac(INITIATOR_LABEL, me, (&frame.node, &frame.nonce))
            .finalize()
            .into_bytes();
        let mut mac = [0; MAC_LEN];
        mac.copy_from_slice(&proof);
        let confirm = build_frame(Step::Confirm, &self.my_node, &self.my_nonce, &mac);
        Ok((confirm, frame.node))
    }

    /// Acceptor: the initiator's confirm arrived; verify it against the challenge we answered.
    fn on_confirm(&mut self, frame: ParsedFrame) -> Result<String, AuthError> {
        if frame.step != Step::Confirm as u8 {
            return Err(AuthError::UnexpectedStep {
                expected: Step::Confirm,
                found: frame.step,
            });
        }
        let Some((peer_node, peer_nonce)) = self.peer.take() else {
            unreachable!("AwaitConfirm is entered only after a challenge was accepted")
        };
        if frame.node != peer_node || frame.nonce != peer_nonce {
            return Err(AuthError::TranscriptMismatch);
        }
        self.transcript_mac(
            INITIATOR_LABEL,
            (&peer_node, &peer_nonce),
            (&self.my_node, &self.my_nonce),
        )
        .verify_slice(&frame.mac)
        .map_err(|_| AuthError::BadMac {
            step: Step::Confirm,
        })?;
        Ok(peer_node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";
    const NONCE_I: Nonce = [0x11; NONCE_LEN];
    const NONCE_A: Nonce = [0xaa; NONCE_LEN];

    fn expect_continue(progress: Progress) -> Vec<u8> {
        match progress {
            Progress::Continue { send } => send,
            other => panic!("expected Continue, got {other:?}"),
        }
    }

    /// The peer name the initiator authenticated.
    type InitiatorOutcome = Result<String, AuthError>;
    /// The peer name the acceptor authenticated, and the bytes that followed the confirm.
    type AcceptorOutcome = Result<(String, Vec<u8>), AuthError>;

    /// Runs a handshake between the two sides; returns both outcomes (peer names as each side sees them).
    fn run(initiator_secret: &[u8], acceptor_secret: &[u8]) -> (InitiatorOutcome, AcceptorOutcome) {
        let (mut initiator, challenge) = Handshake::initiator(initiator_secret, "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(acceptor_secret, "node-b", NONCE_A);
        let response = match acceptor.on_bytes(&challenge) {
            Ok(progress) => expect_continue(progress),
            Err(error) => return (Err(AuthError::Finished), Err(error)),
        };
        let confirm = match initiator.on_bytes(&response) {
            Ok(Progress::Authenticated {
                send,
                peer_node,
                leftover_bytes,
            }) => {
                assert!(leftover_bytes.is_empty());
                (send, peer_node)
            }
            Ok(other) => panic!("initiator: {other:?}"),
            Err(error) => return (Err(error), Err(acceptor.on_closed())),
        };
        let mut pipelined = confirm.0.clone();
        pipelined.extend_from_slice(b"first frames");
        let acceptor_outcome = match acceptor.on_bytes(&pipelined) {
            Ok(Progress::Authenticated {
                send,
                peer_node,
                leftover_bytes,
            }) => {
                assert!(send.is_empty());
                Ok((peer_node, leftover_bytes))
            }
            Ok(other) => panic!("acceptor: {other:?}"),
            Err(error) => Err(error),
        };
        (Ok(confirm.1), acceptor_outcome)
    }

    #[test]
    fn both_sides_authenticate_each_other() {
        let (initiator, acceptor) = run(SECRET, SECRET);
        assert_eq!(initiator, Ok("node-b".to_owned()));
        assert_eq!(
            acceptor,
            Ok(("node-a".to_owned(), b"first frames".to_vec()))
        );
    }

    #[test]
    fn handshake_survives_byte_by_byte_delivery() {
        let (mut initiator, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        let mut response = Vec::new();
        for byte in &challenge {
            response.extend(expect_continue(
                acceptor
                    .on_bytes(std::slice::from_ref(byte))
                    .expect("challenge"),
            ));
        }
        assert_eq!(response.len(), HANDSHAKE_FRAME_LEN);
        let (last, head) = response.split_last().expect("non-empty");
        for byte in head {
            assert!(
                expect_continue(
                    initiator
                        .on_bytes(std::slice::from_ref(byte))
                        .expect("response")
                )
                .is_empty()
            );
        }
        let Ok(Progress::Authenticated { send: confirm, .. }) = initiator.on_bytes(&[*last]) else {
            panic!("initiator did not authenticate")
        };
        for byte in &confirm[..HANDSHAKE_FRAME_LEN - 1] {
            assert!(
                expect_continue(
                    acceptor
                        .on_bytes(std::slice::from_ref(byte))
                        .expect("confirm")
                )
                .is_empty()
            );
        }
        assert!(matches!(
            acceptor.on_bytes(&confirm[HANDSHAKE_FRAME_LEN - 1..]),
            Ok(Progress::Authenticated { ref peer_node, .. }) if peer_node == "node-a"
        ));
        assert_eq!(acceptor.on_bytes(b"x"), Err(AuthError::Finished));
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        // The initiator with the wrong secret refuses the genuine acceptor's response...
        let (initiator, _) = run(b"the wrong secret, same length..", SECRET);
        assert_eq!(
            initiator,
            Err(AuthError::BadMac {
                step: Step::Response
            })
        );
        // ...and an impostor initiator that goes on anyway is refused by the acceptor.
        let (mut impostor, challenge) =
            Handshake::initiator(b"the wrong secret, same length..", "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        let response = expect_continue(acceptor.on_bytes(&challenge).expect("challenge"));
        assert!(impostor.on_bytes(&response).is_err());
        // Forge a confirm with the impostor's key, as if it had skipped its own check.
        let forged_key =
            HmacSha256::new_from_slice(b"the wrong secret, same length..").expect("any length");
        let mut forged_mac = forged_key;
        forged_mac.update(INITIATOR_LABEL);
        for name in ["node-a", "node-b"] {
            forged_mac.update(&[name.len() as u8]);
            forged_mac.update(name.as_bytes());
        }
        forged_mac.update(&NONCE_I);
        forged_mac.update(&NONCE_A);
        let mut mac = [0; MAC_LEN];
        mac.copy_from_slice(&forged_mac.finalize().into_bytes());
        let confirm = build_frame(Step::Confirm, "node-a", &NONCE_I, &mac);
        assert_eq!(
            acceptor.on_bytes(&confirm),
            Err(AuthError::BadMac {
                step: Step::Confirm
            })
        );
        assert_eq!(acceptor.on_bytes(&confirm), Err(AuthError::Finished));
    }

    #[test]
    fn reflected_response_is_refused_as_confirm() {
        // An attacker who got the acceptor's response sends it back as the confirm, relabelled.
        let (_, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        let response = expect_continue(acceptor.on_bytes(&challenge).expect("challenge"));
        let mut reflected = build_frame(Step::Confirm, "node-a", &NONCE_I, &[0; MAC_LEN]);
        reflected[MAC_OFFSET..].copy_from_slice(&response[MAC_OFFSET..]);
        assert_eq!(
            acceptor.on_bytes(&reflected),
            Err(AuthError::BadMac {
                step: Step::Confirm
            })
        );
        // Sent back unchanged, it fails on its step.
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        let response = expect_continue(acceptor.on_bytes(&challenge).expect("challenge"));
        assert_eq!(
            acceptor.on_bytes(&response),
            Err(AuthError::UnexpectedStep {
                expected: Step::Confirm,
                found: Step::Response as u8
            })
        );
    }

    #[test]
    fn reflected_challenge_and_connection_to_self_are_refused() {
        // Our own challenge reflected to us (acceptor with the same name), or just our nonce echoed.
        let (mut initiator, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        let mut same_name = Handshake::acceptor(SECRET, "node-a", NONCE_A);
        assert_eq!(
            same_name.on_bytes(&challenge),
            Err(AuthError::PeerIsSelf {
                node: "node-a".into()
            })
        );
        let mut same_nonce = Handshake::acceptor(SECRET, "node-b", NONCE_I);
        assert_eq!(
            same_nonce.on_bytes(&challenge),
            Err(AuthError::NonceReflected)
        );
        let mirrored = build_frame(Step::Response, "node-a", &NONCE_A, &[0; MAC_LEN]);
        assert_eq!(
            initiator.on_bytes(&mirrored),
            Err(AuthError::PeerIsSelf {
                node: "node-a".into()
            })
        );
    }

    #[test]
    fn replayed_confirm_from_another_session_is_refused() {
        // Record a complete, genuine session.
        let (mut initiator, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        let response = expect_continue(acceptor.on_bytes(&challenge).expect("challenge"));
        let Ok(Progress::Authenticated { send: confirm, .. }) = initiator.on_bytes(&response)
        else {
            panic!("genuine session failed")
        };
        // Replay challenge and confirm to an acceptor whose nonce is, as always, fresh.
        let mut later = Handshake::acceptor(SECRET, "node-b", [0xbb; NONCE_LEN]);
        expect_continue(
            later
                .on_bytes(&challenge)
                .expect("challenge replays fine: it proves nothing"),
        );
        assert_eq!(
            later.on_bytes(&confirm),
            Err(AuthError::BadMac {
                step: Step::Confirm
            })
        );
        // Replay the response to an initiator with a fresh nonce.
        let (mut later_initiator, _) = Handshake::initiator(SECRET, "node-a", [0x22; NONCE_LEN]);
        assert_eq!(
            later_initiator.on_bytes(&response),
            Err(AuthError::BadMac {
                step: Step::Response
            })
        );
    }

    #[test]
    fn confirm_must_match_the_challenge() {
        let (_, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        expect_continue(acceptor.on_bytes(&challenge).expect("challenge"));
        let other_node = build_frame(Step::Confirm, "node-c", &NONCE_I, &[0; MAC_LEN]);
        assert_eq!(
            acceptor.on_bytes(&other_node),
            Err(AuthError::TranscriptMismatch)
        );
    }

    #[test]
    fn truncated_handshake_is_refused() {
        let (_, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        assert!(expect_continue(acceptor.on_bytes(&challenge[..100]).expect("partial")).is_empty());
        assert_eq!(
            acceptor.on_closed(),
            AuthError::Truncated {
                expected: Step::Challenge,
                received: 100
            }
        );
        let (initiator, _) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        assert_eq!(
            initiator.on_closed(),
            AuthError::Truncated {
                expected: Step::Response,
                received: 0
            }
        );
    }

    #[test]
    fn garbage_and_malformed_frames_are_refused() {
        let (_, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        // (byte position, value written there, expected refusal)
        let cases = [
            (0, b'X', AuthError::BadMagic { found: *b"XBAU" }),
            (4, 2, AuthError::UnsupportedVersion { found: 2 }),
            (
                5,
                9,
                AuthError::UnexpectedStep {
                    expected: Step::Challenge,
                    found: 9,
                },
            ),
            (
                5,
                3,
                AuthError::UnexpectedStep {
                    expected: Step::Challenge,
                    found: 3,
                },
            ),
            (6, 0, AuthError::NodeNameLength { length: 0 }),
            (6, 65, AuthError::NodeNameLength { length: 65 }),
            (7, 1, AuthError::NonZeroPadding),
            (NODE_OFFSET + 10, b'x', AuthError::NonZeroPadding),
            (NODE_OFFSET, 0xff, AuthError::NodeNameNotUtf8),
            (MAC_OFFSET, 1, AuthError::NonZeroPadding),
        ];
        for (position, value, expected) in cases {
            let mut frame = challenge.clone();
            frame[position] = value;
            let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
            assert_eq!(acceptor.on_bytes(&frame), Err(expected));
            assert_eq!(acceptor.on_bytes(&challenge), Err(AuthError::Finished));
        }
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        assert!(matches!(
            acceptor.on_bytes(
                b"GET / HTTP/1.1\r\nHost: ferroblock\r\n\r\n"
                    .repeat(4)
                    .as_slice()
            ),
            Err(AuthError::BadMagic { .. })
        ));
    }

    #[test]
    fn bytes_the_peer_could_not_have_sent_yet_are_refused() {
        let (mut initiator, challenge) = Handshake::initiator(SECRET, "node-a", NONCE_I);
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        let mut early = challenge.clone();
        early.push(0);
        assert_eq!(
            acceptor.on_bytes(&early),
            Err(AuthError::UnexpectedBytes { count: 1 })
        );
        let mut acceptor = Handshake::acceptor(SECRET, "node-b", NONCE_A);
        let mut response = expect_continue(acceptor.on_bytes(&challenge).expect("challenge"));
        response.extend_from_slice(b"frames");
        assert_eq!(
            initiator.on_bytes(&response),
            Err(AuthError::UnexpectedBytes { count: 6 })
        );
    }

    #[test]
    fn fresh_nonces_differ() {
        assert_ne!(
            fresh_nonce().expect("entropy"),
            fresh_nonce().expect("entropy")
        );
    }

    #[test]
    #[should_panic(expected = "secret shorter")]
    fn short_secret_is_our_bug() {
        Handshake::acceptor(b"short", "node-b", NONCE_A);
    }
}
