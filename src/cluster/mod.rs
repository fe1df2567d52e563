//! A cluster of ferroblock nodes: its configuration (nodes, volumes, replication settings), the
//! authority that records each volume's membership and epoch, the live status nodes publish, and the
//! `cluster init` and `status` commands.

pub mod authority;
pub mod command;
pub mod config;
pub mod report;
pub mod status;
