//! The authority: the one place that decides who is master of a volume, by compare-and-swap on the
//! volume's epoch. Everything else (the replication peers, `ferroblock status`) only reads it or asks
//! it to change. The embedded default is a file shared by the nodes of one machine.

use serde::{Deserialize, Serialize};

/// A volume's membership at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Grows with every change; a peer that sees a higher epoch stops acting on an older one.
    pub epoch: u64,
    /// The node that serves the volume.
    pub master: String,
    /// The node that holds a complete, in-sync copy and may take over; `None` while the master is
    /// solo.
    pub slave: Option<String>,
    /// A node that dropped out of sync, and the last op its copy shares with the master's history:
    /// when it returns it is caught up from there (its own changes after that op are repaired).
    pub dropped: Option<Dropped>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub node: String,
    pub common_op: u64,
}
