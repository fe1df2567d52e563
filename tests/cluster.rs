//! `ferroblock cluster init`, `ferroblock status` and `serve --config/--node`, run as the binary.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferroblock::cluster::authority::{Authority, CasOutcome, Dropped, FileAuthority, Membership};
use ferroblock::cluster::config::ClusterConfig;
use ferroblock::cluster::report::ClusterReport;
use ferroblock::cluster::status::{PeerState, Role, StatusBoard};
use ferroblock::metrics::Metrics;

fn ferroblock(args: &[&str]) -> Output {
    run_bounded(
        Command::new(ferroblock_bin()).args(args),
        Duration::from_secs(30),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A base port whose metrics ports (base+200, base+201) were free a moment ago, so that `status`
/// finds those nodes offline.
fn base_port_with_free_metrics_ports() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port > 1200 && port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port - 200;
        }
    }
}

fn init(dir: &Path, nodes: &str, base_port: u16) -> Output {
    ferroblock(&[
        "cluster",
        "init",
        dir.to_str().unwrap(),
        "--nodes",
        nodes,
        "--base-port",
        &base_port.to_string(),
    ])
}

/// A temporary directory with a cluster from `cluster init` in its `c/` (which must succeed): the
/// directory (kept alive by the caller) and the cluster's directory.
fn initialized(tag: &str, nodes: &str, base_port: u16) -> (TempDir, PathBuf) {
    let temp = TempDir::new(tag);
    let dir = temp.join("c");
    let out = init(&dir, nodes, base_port);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    (temp, dir)
}

fn status_json(config: &Path) -> ClusterReport {
    let out = ferroblock(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|error| {
        panic!("status --json does not parse ({error}): {}", describe(&out))
    })
}

#[test]
fn init_writes_the_config_the_authority_and_data_dirs() {
    let (_temp, dir) = initialized("cluster-init", "3", 20000);

    let config_path = dir.join("cluster.toml");
    let mode = std::fs::metadata(&config_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "cluster.toml holds the secret");
    let config = ClusterConfig::load(&config_path).unwrap();
    assert_eq!(config.nodes.len(), 3);
    for (index, node) in config.nodes.iter().enumerate() {
        let k = index as u16;
        assert_eq!(node.id, format!("n{}", k + 1));
        assert_eq!(
            node.nbd,
            format!("127.0.0.1:{}", 20000 + k).parse().unwrap()
        );
        assert_eq!(
            node.replication,
            format!("127.0.0.1:{}", 20100 + k).parse().unwrap()
        );
        assert_eq!(
            node.metrics,
            format!("127.0.0.1:{}", 20200 + k).parse().unwrap()
        );
        assert_eq!(node.data_dir, dir.join(&node.id));
        assert!(node.data_dir.is_dir());
    }
    let volume = config.volume("vol0").unwrap();
    assert_eq!(volume.size_bytes, 1 << 30);
    assert_eq!(volume.peers, ["n1", "n2"]);
    assert_eq!(config.cluster.secret.as_bytes().len(), 32);

    let authority: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("authority.json")).unwrap()).unwrap();
    let vol0 = &authority["volumes"]["vol0"];
    assert_eq!(vol0["epoch"], 1);
    assert_eq!(vol0["master"], "n1");
    assert_eq!(vol0["slave"], "n2");
    assert!(vol0["dropped"].is_null());
}

#[test]
fn init_refuses_to_overwrite_and_bad_values() {
    let (temp, dir) = initialized("cluster-init-refuse", "2", 20000);
    let config_path = dir.join("cluster.toml");
    let before = std::fs::read(&config_path).unwrap();

    let out = init(&dir, "4", 30000);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(text(&out.stderr).contains("--force"), "{}", describe(&out));
    assert_eq!(std::fs::read(&config_path).unwrap(), before, "overwritten");

    // The authority moves on; --force starts over.
    let authority = FileAuthority::open(&dir.join("authority.json")).unwrap();
    let solo = Membership {
        epoch: 2,
        master: "n2".into(),
        slave: None,
        dropped: None,
    };
    assert_eq!(
        authority.compare_and_swap("vol0", 1, &solo).unwrap(),
        CasOutcome::Swapped
    );
    let out = ferroblock(&[
        "cluster",
        "init",
        dir.to_str().unwrap(),
        "--nodes",
        "4",
        "--base-port",
        "30000",
        "--force",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let config = ClusterConfig::load(&config_path).unwrap();
    assert_eq!(config.nodes.len(), 4);
    assert_eq!(config.nodes[0].nbd.port(), 30000);
    assert_eq!(authority.read("vol0").unwrap().unwrap().epoch, 1);

    let other = temp.join("d");
    for (nodes, base_port, needle) in [
        ("1", 20000, "nodes"),
        ("101", 20000, "nodes"),
        ("2", 65400, "65535"),
    ] {
        let out = init(&other, nodes, base_port);
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        assert!(text(&out.stderr).contains(needle), "{}", describe(&out));
        assert!(!other.join("cluster.toml").exists());
    }
}

#[test]
fn status_shows_the_authority_and_offline_nodes() {
    let (_temp, dir) = initialized(
        "cluster-status-offline",
        "2",
        base_port_with_free_metrics_ports(),
    );
    let config_path = dir.join("cluster.toml");

    let out = ferroblock(&["status", "--config", config_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let table = text(&out.stdout);
    assert!(table.contains("volume vol0"), "{table}");
    assert!(table.contains("epoch 1"), "{table}");
    let rows: Vec<&str> = table
        .lines()
        .filter(|line| line.trim_start().starts_with("n"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows.iter().all(|row| row.contains("offline")), "{table}");

    let report = status_json(&config_path);
    let volume = &report.volumes[0];
    assert_eq!(volume.name, "vol0");
    assert_eq!(volume.epoch, Some(1));
    assert_eq!(volume.master.as_deref(), Some("n1"));
    assert_eq!(volume.slave.as_deref(), Some("n2"));
    let peers: Vec<_> = volume
        .peers
        .iter()
        .map(|p| {
            (
                p.node.as_str(),
                p.assigned.as_str(),
                p.role.as_str(),
                p.committed,
            )
        })
        .collect();
    assert_eq!(
        peers,
        [
            ("n1", "master", "offline", None),
            ("n2", "slave", "offline", None)
        ]
    );

    // A failover recorded in the authority shows at once.
    let authority = FileAuthority::open(&dir.join("authority.json")).unwrap();
    let solo = Membership {
        epoch: 2,
        master: "n2".into(),
        slave: None,
        dropped: Some(Dropped {
            node: "n1".into(),
            common_op: 7,
        }),
    };
    assert_eq!(
        authority.compare_and_swap("vol0", 1, &solo).unwrap(),
        CasOutcome::Swapped
    );
    let report = status_json(&config_path);
    let volume = &report.volumes[0];
    assert_eq!(volume.epoch, Some(2));
    assert_eq!(volume.master.as_deref(), Some("n2"));
    assert_eq!(volume.slave, None);
    assert_eq!(volume.dropped, solo.dropped);
    assert_eq!(volume.peers[1].assigned, "dropped");
}

/// A node that publishes its state (an in-process metrics endpoint with a status board stands in for
/// a replicated server) is shown with its role, op and watermark; the other stays offline.
#[test]
fn status_reads_a_live_node() {
    let (_temp, dir) = initialized(
        "cluster-status-live",
        "2",
        base_port_with_free_metrics_ports(),
    );
    let config_path = dir.join("cluster.toml");

    let metrics = Arc::new(Metrics::new(&["vol0"], 1));
    let address =
        ferroblock::metrics::serve("127.0.0.1:0".parse().unwrap(), metrics.clone()).unwrap();
    let board = Arc::new(StatusBoard::new("n1", &["vol0"]));
    metrics.attach_status(board.clone()).unwrap();
    board.publish(
        0,
        &PeerState {
            role: Role::Master,
            epoch: 1,
            op: 42,
            committed: 40,
            peer_acked: Some(38),
        },
    );
    let mut config = ClusterConfig::load(&config_path).unwrap();
    config.nodes[0].metrics = address;
    std::fs::write(&config_path, config.to_toml().unwrap()).unwrap();

    let report = status_json(&config_path);
    let peers = &report.volumes[0].peers;
    assert_eq!(peers[0].node, "n1");
    assert_eq!(peers[0].role, "master");
    assert_eq!(
        (
            peers[0].epoch,
            peers[0].op,
            peers[0].committed,
            peers[0].peer_acked,
            peers[0].lag
        ),
        (Some(1), Some(42), Some(40), Some(38), Some(0))
    );
    assert_eq!(peers[1].role, "offline");

    // The authority moved to epoch 2 without n1: n1 acting on epoch 1 is stale.
    let authority = FileAuthority::open(&config.cluster.authority).unwrap();
    let solo = Membership {
        epoch: 2,
        master: "n2".into(),
        slave: None,
        dropped: Some(Dropped {
            node: "n1".into(),
            common_op: 38,
        }),
    };
    authority.compare_and_swap("vol0", 1, &solo).unwrap();
    let report = status_json(&config_path);
    let n1 = report.volumes[0]
        .peers
        .iter()
        .find(|p| p.node == "n1")
        .unwrap();
    assert_eq!(n1.role, "stale");
    let out = ferroblock(&["status", "--config", config_path.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("stale"), "{}", describe(&out));
}

#[test]
fn status_exits_1_when_config_or_authority_cannot_be_read() {
    let (temp, dir) = initialized(
        "cluster-status-broken",
        "2",
        base_port_with_free_metrics_ports(),
    );
    let config_path = dir.join("cluster.toml");
    let authority_path = dir.join("authority.json");

    let missing = temp.join("missing.toml");
    let out = ferroblock(&["status", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("missing.toml"),
        "{}",
        describe(&out)
    );

    std::fs::write(&authority_path, b"{\"format_version\":1,\"volu").unwrap();
    let out = ferroblock(&["status", "--config", config_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(text(&out.stderr).contains("damaged"), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("authority.json"),
        "{}",
        describe(&out)
    );

    std::fs::remove_file(&authority_path).unwrap();
    let out = ferroblock(&[
        "status",
        "--config",
        config_path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(text(&out.stderr).contains("missing"), "{}", describe(&out));
}

#[test]
fn serve_with_a_cluster_config_checks_the_node() {
    let (_temp, dir) = initialized("cluster-serve", "2", 20000);
    let config = dir.join("cluster.toml");
    let config = config.to_str().unwrap();

    let out = ferroblock(&["serve", "--config", config, "--node", "n7"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(text(&out.stderr).contains("n7"), "{}", describe(&out));

    for args in [
        vec!["serve", "--config", config],
        vec!["serve", "--node", "n1"],
    ] {
        let out = ferroblock(&args);
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    }
    let out = ferroblock(&[
        "serve",
        "--config",
        "/nonexistent/cluster.toml",
        "--node",
        "n1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    // Write-back acknowledges writes the device has not synced: never on a replicated volume.
    let out = ferroblock(&[
        "serve",
        "--config",
        config,
        "--node",
        "n1",
        "--durability",
        "write-back",
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("write-back is for single-node volumes"),
        "{}",
        describe(&out)
    );
    // A valid node serves: tests/replication.rs runs nodes.
}
