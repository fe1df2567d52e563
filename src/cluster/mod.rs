//! A cluster of ferroblock nodes: its configuration (nodes, volumes, replication settings) and the
//! authority that records each volume's membership and epoch.

pub mod authority;
