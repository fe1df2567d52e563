//! ferroblock: a polled-mode, userland block storage target.
//!
//! Layers, with data flowing one way: `frontend` (NBD) -> `volume` (requests, completions) -> `io`
//! (memory, io_uring). `reactor` runs beneath all of them: one pinned thread per core that polls sockets,
//! its io_uring and its inbound rings. `config` turns command-line flags into a validated server
//! description; `server` wires everything up.

pub mod alloc;
pub mod btree;
pub mod cluster;
pub mod config;
pub mod frontend;
pub mod io;
pub mod journal;
pub mod loadgen;
pub mod metrics;
pub mod plot;
pub mod reactor;
pub mod replication;
pub mod server;
#[cfg(test)]
mod sim_rng;
pub mod volume;
