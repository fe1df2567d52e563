//! A node's live replication state, as it publishes it at `GET /status` on its metrics endpoint and as
//! `ferroblock status` reads it.
//!
//! Owns: the JSON shape (`NodeStatus`, `VolumeStatus`), the role names, and `StatusBoard`, the cell
//! through which the owner of a volume's state (its reactor) publishes it to the metrics thread.
//! Must never: make a publisher wait for a reader or allocate on the publishing side (a publish is a
//! handful of relaxed atomic stores inside a sequence lock), or hand a reader a torn mix of two
//! publishes.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};

use serde::{Deserialize, Serialize};

/// What `GET /status` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id in the cluster configuration.
    pub node: String,
    /// The volumes that have a peer on this node and have published a state.
    pub volumes: Vec<VolumeStatus>,
}

/// One peer's state, as the node holding it sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// `Role::as_str`: master, slave, solo-master, catching-up, fenced, log-peer, provisioning.
    pub role: String,
    /// The epoch this peer acts on.
    pub epoch: u64,
    /// The last op assigned (master) or received (slave).
    pub op: u64,
    /// Commit watermark: every op up to it is committed (readable) on this peer.
    pub committed: u64,
    /// On a master: the commit watermark its slave last acknowledged.
    pub peer_acked: Option<u64>,
}

/// A peer's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Master = 1,
    Slave = 2,
    SoloMaster = 3,
    CatchingUp = 4,
    Fenced = 5,
    LogPeer = 6,
    Provisioning = 7,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Master,
        Role::Slave,
        Role::SoloMaster,
        Role::CatchingUp,
        Role::Fenced,
        Role::LogPeer,
        Role::Provisioning,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Slave => "slave",
            Role::SoloMaster => "solo-master",
            Role::CatchingUp => "catching-up",
            Role::Fenced => "fenced",
            Role::LogPeer => "log-peer",
            Role::Provisioning => "provisioning",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }

    /// Serves the volume to hosts.
    pub fn is_master(self) -> bool {
        matches!(self, Role::Master | Role::SoloMaster)
    }

    fn from_u8(value: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|role| *role as u8 == value)
    }
}

/// What a peer publishes about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    pub role: Role,
    pub epoch: u64,
    pub op: u64,
    pub committed: u64,
    pub peer_acked: Option<u64>,
}

/// `peer_acked: None` in a cell.
const NO_PEER_ACKED: u64 = u64::MAX;
/// Role byte of a cell that was never published.
const UNPUBLISHED: u8 = 0;

/// One volume's published state: a sequence lock over atomics. The sequence is odd while a publish
/// is in progress; a reader retries until it read the same even sequence before and after.
#[derive(Debug)]
struct VolumeCell {
    name: String,
    sequence: AtomicU64,
    role: AtomicU8,
    epoch: AtomicU64,
    op: AtomicU64,
    committed: AtomicU64,
    peer_acked: AtomicU64,
}

/// A node's published status: one cell per volume, written by the volume's owner, read by the
/// metrics endpoint. Share it as `Arc<StatusBoard>`.
#[derive(Debug)]
pub struct StatusBoard {
    node: String,
    volumes: Box<[VolumeCell]>,
}

impl StatusBoard {
    /// A board for node `node` with the given volumes, none published yet.
    pub fn new(node: &str, volume_names: &[&str]) -> StatusBoard {
        StatusBoard {
            node: node.to_owned(),
            volumes: volume_names
                .iter()
                .map(|name| VolumeCell {
                    name: (*name).to_owned(),
                    sequence: AtomicU64::new(0),
                    role: AtomicU8::new(UNPUBLISHED),
                    epoch: AtomicU64::new(0),
                    op: AtomicU64::new(0),
                    committed: AtomicU64::new(0),
                    peer_acked: AtomicU64::new(NO_PEER_ACKED),
                })
                .collect(),
        }
    }

    /// The index `publish` takes for volume `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.volumes.iter().position(|cell| cell.name == name)
    }

    /// Publishes volume `index`'s state. Meant for its single owner; concurrent publishers of one
    /// volume are serialized (briefly spinning), never torn. Panics if `index` is out of range.
    pub fn publish(&self, index: usize, state: &PeerState) {
        let cell = &self.volumes[index];
        let mut sequence = cell.sequence.load(Ordering::Relaxed);
        loop {
            if sequence.is_multiple_of(2) {
                match cell.sequence.compare_exchange_weak(
                    sequence,
                    sequence + 1,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => sequence = now,
                }
            } else {
                std::hint::spin_loop();
                sequence = cell.sequence.load(Ordering::Relaxed);
            }
        }
        // The odd sequence must be visible before any field changes.
        fence(Ordering::Release);
        cell.role.store(state.role as u8, Ordering::Relaxed);
        cell.epoch.store(state.epoch, Ordering::Relaxed);
        cell.op.store(state.op, Ordering::Relaxed);
        cell.committed.store(state.committed, Ordering::Relaxed);
        cell.peer_acked
            .store(state.peer_acked.unwrap_or(NO_PEER_ACKED), Ordering::Relaxed);
        cell.sequence.store(sequence + 2, Ordering::Release);
    }

    /// A consistent copy of every published volume's state.
    pub fn snapshot(&self) -> NodeStatus {
        NodeStatus {
            node: self.node.clone(),
            volumes: self
                .volumes
                .iter()
                .filter_map(|cell| {
                    let state = read_cell(cell)?;
                    Some(VolumeStatus {
                        name: cell.name.clone(),
                        role: state.role.as_str().to_owned(),
                        epoch: state.epoch,
                        op: state.op,
                        committed: state.committed,
                        peer_acked: state.peer_acked,
                    })
                })
                .collect(),
        }
    }
}

fn read_cell(cell: &VolumeCell) -> Option<PeerState> {
    loop {
        let before = cell.sequence.load(Ordering::Acquire);
        if !before.is_multiple_of(2) {
            std::hint::spin_loop();
            continue;
        }
        let role = cell.role.load(Ordering::Relaxed);
        let epoch = cell.epoch.load(Ordering::Relaxed);
        let op = cell.op.load(Ordering::Relaxed);
        let committed = cell.committed.load(Ordering::Relaxed);
        let peer_acked = cell.peer_acked.load(Ordering::Relaxed);
        // The field loads must complete before the sequence is checked again.
        fence(Ordering::Acquire);
        if cell.sequence.load(Ordering::Relaxed) != before {
            continue;
        }
        return Some(PeerState {
            role: Role::from_u8(role)?,
            epoch,
            op,
            committed,
            peer_acked: (peer_acked != NO_PEER_ACKED).then_some(peer_acked),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn role_names_round_trip() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            assert_eq!(Role::from_u8(role as u8), Some(role));
        }
        assert_eq!(Role::parse("offline"), None);
        assert_eq!(Role::from_u8(UNPUBLISHED), None);
    }

    #[test]
    fn only_published_volumes_appear() {
        let board = StatusBoard::new("n1", &["vol0", "vol1"]);
        assert_eq!(board.snapshot().volumes, []);
        let index = board.index_of("vol1").unwrap();
        board.publish(
            index,
            &PeerState {
                role: Role::Master,
                epoch: 3,
                op: 10,
                committed: 9,
                peer_acked: Some(8),
            },
        );
        let status = board.snapshot();
        assert_eq!(status.node, "n1");
        assert_eq!(
            status.volumes,
            [VolumeStatus {
                name: "vol1".into(),
                role: "master".into(),
                epoch: 3,
                op: 10,
                committed: 9,
                peer_acked: Some(8),
            }]
        );
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<NodeStatus>(&json).unwrap(), status);
    }

    /// A reader racing a publisher only ever sees whole publishes (every field of one publish derives
    /// from the same counter).
    #[test]
    fn snapshots_are_never_torn() {
        let board = Arc::new(StatusBoard::new("n1", &["vol0"]));
        let done = Arc::new(AtomicBool::new(false));
        let publisher = {
            let board = board.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                for n in 1..=20_000u64 {
                    board.publish(
                        0,
                        &PeerState {
                            role: if n % 2 == 0 {
                                Role::Master
                            } else {
                                Role::Slave
                            },
                            epoch: n,
                            op: n * 3,
                            committed: n * 3 - 1,
                            peer_acked: (n % 3 != 0).then_some(n * 5),
                        },
                    );
                }
                done.store(true, Ordering::Release);
            })
        };
        let mut seen = 0u64;
        while !done.load(Ordering::Acquire) {
            for volume in board.snapshot().volumes {
                let n = volume.epoch;
                assert_eq!(volume.op, n * 3);
                assert_eq!(volume.committed, n * 3 - 1);
                assert_eq!(volume.peer_acked, (n % 3 != 0).then_some(n * 5));
                assert_eq!(volume.role, if n % 2 == 0 { "master" } else { "slave" });
                assert!(n >= seen, "went back from {seen} to {n}");
                seen = n;
            }
        }
        publisher.join().unwrap();
        assert_eq!(board.snapshot().volumes[0].epoch, 20_000);
    }
}
