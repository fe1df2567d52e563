//! NBD (fixed newstyle) front-end.
//!
//! `proto` is the wire format, `negotiation` the sans-IO handshake, `request` the validation of
//! transmission requests, and `connection` the socket side that ties them to a volume.

pub mod connection;
pub mod negotiation;
pub mod proto;
pub mod request;

pub use connection::{CloseReason, Connection};
pub use negotiation::ExportInfo;
