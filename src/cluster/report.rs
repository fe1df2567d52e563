//! `ferroblock status`: the authority's view of each volume joined with what each node says about its
//! peer, as a table or as JSON.
//!
//! Owns: fetching `GET /status` from a node (plain HTTP/1.0 over `std::net::TcpStream`, bounded in time
//! and size), the rules that turn the authority's membership and the nodes' reports into one role per
//! peer, and the rendering. Must never: change the authority or a node, wait on a node without a
//! timeout, or show a node's claim as current when its epoch disagrees with the authority.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::authority::{Dropped, Membership};
use crate::cluster::config::ClusterConfig;
use crate::cluster::status::{NodeStatus, Role};

/// Largest `/status` answer accepted.
const STATUS_RESPONSE_BYTES_MAX: u64 = 4 << 20;
/// Role shown for a peer whose node did not answer or does not report the volume.
pub const ROLE_OFFLINE: &str = "offline";
/// Role shown for a peer whose node acts on an older epoch than the authority's (and does not know it
/// is fenced).
pub const ROLE_STALE: &str = "stale";
/// Role shown for a peer whose node claims a newer epoch than the authority has (the authority file
/// was replaced, or the node is misconfigured).
pub const ROLE_AHEAD: &str = "epoch-ahead";

/// Why a node's status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{address}: {source}")]
    Io {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{address} answered {status_line:?}")]
    Http {
        address: SocketAddr,
        status_line: String,
    },
    #[error("{address} sent more than {STATUS_RESPONSE_BYTES_MAX} bytes")]
    TooLarge { address: SocketAddr },
    #[error("{address} sent a status that does not parse: {detail}")]
    Parse { address: SocketAddr, detail: String },
    #[error("{address} is node {found:?}, not {expected:?}")]
    WrongNode {
        address: SocketAddr,
        expected: String,
        found: String,
    },
}

/// GETs `/status` from a node's metrics endpoint. `timeout` bounds the connect and each read and write.
pub fn fetch_node_status(address: SocketAddr, timeout: Duration) -> Result<NodeStatus, FetchError> {
    let io_error = |source| FetchError::Io { address, source };
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|source| FetchError::Connect { address, source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    stream
        .write_all(format!("GET /status HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .map_err(io_error)?;
    let mut response = Vec::new();
    stream
        .take(STATUS_RESPONSE_BYTES_MAX + 1)
        .read_to_end(&mut response)
        .map_err(io_error)?;
    if response.len() as u64 > STATUS_RESPONSE_BYTES_MAX {
        return Err(FetchError::TooLarge { address });
    }
    let header_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| FetchError::Parse {
            address,
            detail: "no end of HTTP header".into(),
        })?;
    let header = String::from_utf8_lossy(&response[..header_end]);
    let status_line = header.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1);
    if !status_line.starts_with("HTTP/") || code != Some("200") {
        return Err(FetchError::Http {
            address,
            status_line: status_line.to_owned(),
        });
    }
    serde_json::from_slice(&response[header_end + 4..]).map_err(|error| FetchError::Parse {
        address,
        detail: error.to_string(),
    })
}

/// Fetches every node's status at once (one thread per node), each bounded by `timeout`; checks that
/// each answer comes from the node asked.
pub fn fetch_all(
    config: &ClusterConfig,
    timeout: Duration,
) -> HashMap<String, Result<NodeStatus, FetchError>> {
    std::thread::scope(|scope| {
        let fetches: Vec<_> = config
            .nodes
            .iter()
            .map(|node| {
                let handle = scope.spawn(move || {
                    let status = fetch_node_status(node.metrics, timeout)?;
                    if status.node != node.id {
                        return Err(FetchError::WrongNode {
                            address: node.metrics,
                            expected: node.id.clone(),
                            found: status.node,
                        });
                    }
                    Ok(status)
                });
                (node, handle)
            })
            .collect();
        fetches
            .into_iter()
            .map(|(node, handle)| {
                let result = handle.join().unwrap_or_else(|_| {
                    Err(FetchError::Parse {
                        address: node.metrics,
                        detail: "the fetching thread panicked".into(),
                    })
                });
                (node.id.clone(), result)
            })
            .collect()
    })
}

/// What `ferroblock status --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub volumes: Vec<VolumeReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub name: String,
    /// From the configuration; `None` for a volume only the authority knows.
    pub size_bytes: Option<u64>,
    /// The authority's membership; all `None` if it has none for this volume.
    pub epoch: Option<u64>,
    pub master: Option<String>,
    pub slave: Option<String>,
    pub dropped: Option<Dropped>,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub node: String,
    /// What the authority made this peer: `master`, `slave`, `dropped`, or `none`.
    pub assigned: String,
    /// The role shown: the node's own when it answered at the authority's epoch; else `offline`,
    /// `fenced`, `stale` or `epoch-ahead`.
    pub role: String,
    /// The epoch the node reports, if it answered.
    pub epoch: Option<u64>,
    pub op: Option<u64>,
    pub committed: Option<u64>,
    pub peer_acked: Option<u64>,
    /// The master's commit watermark minus this peer's (when both are known).
    pub lag: Option<u64>,
    /// Why the role is what it is, when that is not the node's own word.
    pub note: Option<String>,
}

/// Joins the configuration, the authority's memberships and the nodes' answers.
pub fn build_report(
    config: &ClusterConfig,
    memberships: &BTreeMap<String, Membership>,
    statuses: &HashMap<String, Result<NodeStatus, FetchError>>,
) -> ClusterReport {
    let mut names: Vec<&str> = config.volumes.iter().map(|v| v.name.as_str()).collect();
    for name in memberships.keys() {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    let volumes = names
        .into_iter()
        .map(|name| {
            let membership = memberships.get(name);
            let mut nodes: Vec<(&str, &str)> = Vec::new();
            if let Some(membership) = membership {
                nodes.push((&membership.master, "master"));
                if let Some(slave) = &membership.slave {
                    nodes.push((slave, "slave"));
                }
                if let Some(dropped) = &membership.dropped {
                    nodes.push((&dropped.node, "dropped"));
                }
            }
            if let Some(volume) = config.volume(name) {
                for peer in &volume.peers {
                    if !nodes.iter().any(|(node, _)| node == peer) {
                        nodes.push((peer, "none"));
                    }
                }
            }
            let mut peers: Vec<PeerReport> = nodes
                .into_iter()
                .map(|(node, assigned)| {
                    peer_report(
                        config,
                        name,
                        node,
                        assigned,
                        membership.map(|m| m.epoch),
                        statuses,
                    )
                })
                .collect();
            let master_committed = peers
                .iter()
                .find(|peer| {
                    peer.assigned == "master"
                        && Role::parse(&peer.role).is_some_and(Role::is_master)
                })
                .and_then(|peer| peer.committed);
            for peer in &mut peers {
                peer.lag = master_committed
                    .zip(peer.committed)
                    .map(|(master, own)| master.saturating_sub(own));
            }
            VolumeReport {
                name: name.to_owned(),
                size_bytes: config.volume(name).map(|v| v.size_bytes),
                epoch: membership.map(|m| m.epoch),
                master: membership.map(|m| m.master.clone()),
                slave: membership.and_then(|m| m.slave.clone()),
                dropped: membership.and_then(|m| m.dropped.clone()),
                peers,
            }
        })
        .collect();
    ClusterReport { volumes }
}

fn peer_report(
    config: &ClusterConfig,
    volume: &str,
    node: &str,
    assigned: &str,
    authority_epoch: Option<u64>,
    statuses: &HashMap<String, Result<NodeStatus, FetchError>>,
) -> PeerReport {
    let mut report = PeerReport {
        node: node.to_owned(),
        assigned: assigned.to_owned(),
        role: ROLE_OFFLINE.to_owned(),
        epoch: None,
        op: None,
        committed: None,
        peer_acked: None,
        lag: None,
        note: None,
    };
    let status = match statuses.get(node) {
        Some(Ok(status)) => status,
        Some(Err(error)) => {
            report.note = Some(error.to_string());
            return report;
        }
        None if config.node(node).is_none() => {
            report.note = Some("not a node of this configuration".into());
            return report;
        }
        None => {
            report.note = Some("not asked".into());
            return report;
        }
    };
    let Some(reported) = status.volumes.iter().find(|v| v.name == volume) else {
        report.note = Some("the node does not report this volume".into());
        return report;
    };
    report.epoch = Some(reported.epoch);
    report.op = Some(reported.op);
    report.committed = Some(reported.committed);
    report.peer_acked = reported.peer_acked;
    report.role = match authority_epoch {
        None => reported.role.clone(),
        Some(epoch) if reported.epoch == epoch => reported.role.clone(),
        Some(epoch) if reported.epoch < epoch => {
            report.note = Some(format!(
                "the node acts on epoch {} as {}; the authority is at {epoch}",
                reported.epoch, reported.role
            ));
            if reported.role == Role::Fenced.as_str() {
                reported.role.clone()
            } else {
                ROLE_STALE.to_owned()
            }
        }
        Some(epoch) => {
            report.note = Some(format!(
                "the node claims epoch {} as {}, newer than the authority's {epoch}",
                reported.epoch, reported.role
            ));
            ROLE_AHEAD.to_owned()
        }
    };
    report
}

/// The report as a table per volume.
pub fn render_table(report: &ClusterReport) -> String {
    let mut out = String::new();
    let dash = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for (index, volume) in report.volumes.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        let _ = write!(out, "volume {}", volume.name);
        if let Some(size_bytes) = volume.size_bytes {
            let _ = write!(out, "  size {size_bytes}");
        }
        match volume.epoch {
            Some(epoch) => {
                let _ = write!(
                    out,
                    "  epoch {epoch}  master {}  slave {}",
                    volume.master.as_deref().unwrap_or("-"),
                    volume.slave.as_deref().unwrap_or("-")
                );
                if let Some(dropped) = &volume.dropped {
                    let _ = write!(
                        out,
                        "  dropped {} (common op {})",
                        dropped.node, dropped.common_op
                    );
                }
                out.push('\n');
            }
            None => out.push_str("  (no membership in the authority)\n"),
        }
        let rows: Vec<[String; 8]> = volume
            .peers
            .iter()
            .map(|peer| {
                [
                    peer.node.clone(),
                    peer.assigned.clone(),
                    peer.role.clone(),
                    dash(peer.epoch),
                    dash(peer.op),
                    dash(peer.committed),
                    dash(peer.lag),
                    peer.note.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let header = [
            "PEER",
            "ASSIGNED",
            "ROLE",
            "EPOCH",
            "OP",
            "COMMITTED",
            "LAG",
            "NOTE",
        ];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        let mut line = |cells: [&str; 8]| {
            let mut text = String::from(" ");
            for (cell, width) in cells.iter().zip(widths) {
                let _ = write!(text, " {cell:<width$}");
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(header);
        for row in &rows {
            line(row.each_ref().map(String::as_str));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::status::VolumeStatus;
    use std::path::Path;

    fn config() -> ClusterConfig {
        let mut text = String::from("[cluster]\nsecret = \"00112233445566778899aabbccddeeff\"\n");
        for (index, id) in ["n1", "n2", "n3"].iter().enumerate() {
            let port = 20000 + index;
            let _ = write!(
                text,
                "[[nodes]]\nid = \"{id}\"\nnbd = \"127.0.0.1:{port}\"\nreplication = \"127.0.0.1:{}\"\n\
                 metrics = \"127.0.0.1:{}\"\ndata_dir = \"{id}\"\n",
                port + 100,
                port + 200
            );
        }
        text.push_str("[[volumes]]\nname = \"vol0\"\nsize = \"1G\"\npeers = [\"n1\", \"n2\"]\n");
        ClusterConfig::parse(&text, Path::new("/tmp")).unwrap()
    }

    fn node_status(node: &str, role: &str, epoch: u64, committed: u64) -> NodeStatus {
        NodeStatus {
            node: node.into(),
            volumes: vec![VolumeStatus {
                name: "vol0".into(),
                role: role.into(),
                epoch,
                op: committed + 2,
                committed,
                peer_acked: None,
            }],
        }
    }

    fn unreachable() -> Result<NodeStatus, FetchError> {
        Err(FetchError::Connect {
            address: "127.0.0.1:1".parse().unwrap(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        })
    }

    fn memberships(membership: Membership) -> BTreeMap<String, Membership> {
        BTreeMap::from([("vol0".to_owned(), membership)])
    }

    #[test]
    fn agreeing_nodes_show_their_roles_and_lag() {
        let statuses = HashMap::from([
            ("n1".to_owned(), Ok(node_status("n1", "master", 4, 100))),
            ("n2".to_owned(), Ok(node_status("n2", "slave", 4, 93))),
            ("n3".to_owned(), unreachable()),
        ]);
        let membership = Membership {
            epoch: 4,
            master: "n1".into(),
            slave: Some("n2".into()),
            dropped: None,
        };
        let report = build_report(&config(), &memberships(membership), &statuses);
        let volume = &report.volumes[0];
        assert_eq!(volume.epoch, Some(4));
        let summary: Vec<_> = volume
            .peers
            .iter()
            .map(|p| (p.node.as_str(), p.role.as_str(), p.committed, p.lag))
            .collect();
        assert_eq!(
            summary,
            [
                ("n1", "master", Some(100), Some(0)),
                ("n2", "slave", Some(93), Some(7))
            ]
        );
        let table = render_table(&report);
        assert!(table.contains("epoch 4  master n1  slave n2"), "{table}");
        assert!(table.contains("LAG"), "{table}");
    }

    #[test]
    fn older_epochs_are_fenced_or_stale_and_silent_nodes_offline() {
        let membership = Membership {
            epoch: 5,
            master: "n2".into(),
            slave: None,
            dropped: Some(Dropped {
                node: "n1".into(),
                common_op: 90,
            }),
        };
        let statuses = HashMap::from([
            ("n1".to_owned(), Ok(node_status("n1", "master", 4, 95))),
            (
                "n2".to_owned(),
                Ok(node_status("n2", "solo-master", 5, 120)),
            ),
        ]);
        let report = build_report(&config(), &memberships(membership.clone()), &statuses);
        let roles: Vec<_> = report.volumes[0]
            .peers
            .iter()
            .map(|p| (p.node.as_str(), p.assigned.as_str(), p.role.as_str(), p.lag))
            .collect();
        assert_eq!(
            roles,
            [
                ("n2", "master", "solo-master", Some(0)),
                ("n1", "dropped", "stale", Some(25))
            ]
        );
        let statuses = HashMap::from([
            ("n1".to_owned(), Ok(node_status("n1", "fenced", 4, 95))),
            ("n2".to_owned(), unreachable()),
        ]);
        let report = build_report(&config(), &memberships(membership), &statuses);
        let peers = &report.volumes[0].peers;
        assert_eq!(peers[0].role, "offline");
        assert!(peers[0].note.as_deref().unwrap().contains("cannot connect"));
        assert_eq!((peers[1].role.as_str(), peers[1].lag), ("fenced", None));
    }

    #[test]
    fn newer_epochs_and_missing_volumes_are_flagged() {
        let membership = Membership {
            epoch: 2,
            master: "n1".into(),
            slave: Some("n2".into()),
            dropped: None,
        };
        let statuses = HashMap::from([
            ("n1".to_owned(), Ok(node_status("n1", "master", 3, 10))),
            (
                "n2".to_owned(),
                Ok(NodeStatus {
                    node: "n2".into(),
                    volumes: vec![],
                }),
            ),
        ]);
        let report = build_report(&config(), &memberships(membership), &statuses);
        let peers = &report.volumes[0].peers;
        assert_eq!(peers[0].role, ROLE_AHEAD);
        assert_eq!(peers[1].role, ROLE_OFFLINE);
        assert_eq!(peers[0].lag, None, "no master at the authority's epoch");
    }

    #[test]
    fn a_volume_without_membership_lists_its_configured_peers() {
        let statuses = HashMap::new();
        let report = build_report(&config(), &BTreeMap::new(), &statuses);
        let volume = &report.volumes[0];
        assert_eq!(volume.epoch, None);
        let peers: Vec<_> = volume
            .peers
            .iter()
            .map(|p| (p.node.as_str(), p.assigned.as_str(), p.role.as_str()))
            .collect();
        assert_eq!(
            peers,
            [("n1", "none", "offline"), ("n2", "none", "offline")]
        );
        assert!(render_table(&report).contains("no membership"));
    }
}
