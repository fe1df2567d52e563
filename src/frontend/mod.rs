//! Front-ends: the protocols hosts speak to reach a volume.
//!
//! Owns: protocol parsing, validation and replies. Must never: touch a store directly (requests go through
//! `volume::SubmitIo`), or trust a client's bytes before they are validated into typed requests.

pub mod nbd;
