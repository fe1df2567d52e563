//! Replication of a volume between two peers: the master streams notes to the slave, commits only what
//! both copies committed, and hands over to the slave (or goes on alone) through the authority when a
//! peer or the link fails.
//!
//! Owns: the replication messages (`message`), their framing, checksums and the authenticated
//! handshake on the wire (`wire`), and the sans-IO state machine of one peer (`peer`), which the
//! reactors drive with real sockets and the simulator (`sim`, tests only) with simulated ones.
//!
//! Must never: acknowledge (or let the volume commit) an op on the master before the slave committed
//! it, act on a message from an older epoch, or serve a volume without holding the authority's
//! mastership and, when paired, a lease renewed by the slave.

pub mod auth;
pub mod hub;
pub mod message;
pub mod peer;
#[cfg(test)]
mod sim;
pub mod wire;
