//! Two real nodes replicating a volume on loopback: writes through a real NBD client, SIGKILL of the
//! master and of the slave, restarts that catch up by op number, a cut link (through a proxy the
//! test controls) after which exactly one node serves, and a copy holding a dropped history that
//! resets itself in place.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ferroblock::cluster::report::ClusterReport;

const WAIT: Duration = Duration::from_secs(60);
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/crash_client.py");

fn ferroblock(args: &[&str]) -> Output {
    run_bounded(
        Command::new(ferroblock_bin()).args(args),
        Duration::from_secs(30),
    )
}

/// A base port P with P..P+1, P+100..P+101 and P+200..P+201 free a moment ago.
fn free_base_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let Some(base) = port
            .checked_sub(0)
            .filter(|p| *p > 1024 && *p < 65000 - 202)
        else {
            continue;
        };
        let free = [0u16, 1, 100, 101, 200, 201]
            .iter()
            .all(|offset| TcpListener::bind(("127.0.0.1", base + offset)).is_ok());
        if free {
            return base;
        }
    }
}

struct Cluster {
    _dir: TempDir,
    config: PathBuf,
    base_port: u16,
}

impl Cluster {
    fn init(tag: &str) -> Cluster {
        let dir = TempDir::new(tag);
        let base_port = free_base_port();
        let out = ferroblock(&[
            "cluster",
            "init",
            dir.join("c").to_str().unwrap(),
            "--nodes",
            "2",
            "--base-port",
            &base_port.to_string(),
        ]);
        assert!(out.status.success(), "cluster init: {}", describe(&out));
        let config = dir.join("c").join("cluster.toml");
        Cluster {
            _dir: dir,
            config,
            base_port,
        }
    }

    fn start(&self, node: &str) -> Server {
        self.start_with(node, &self.config)
    }

    fn start_with(&self, node: &str, config: &Path) -> Server {
        Server::start_raw(&[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--node",
            node,
            "--sparse",
        ])
    }

    fn uri(&self, node: &str) -> String {
        let index: u16 = node[1..].parse().unwrap();
        format!("nbd://127.0.0.1:{}/vol0", self.base_port + index - 1)
    }

    fn status(&self) -> ClusterReport {
        let out = ferroblock(&[
            "status",
            "--config",
            self.config.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|error| panic!("status --json ({error}): {}", describe(&out)))
    }

    /// The role each node reports for vol0 (`offline` when it does not answer).
    fn roles(&self) -> Vec<(String, String)> {
        let report = self.status();
        let volume = report
            .volumes
            .iter()
            .find(|volume| volume.name == "vol0")
            .expect("vol0 in the report");
        let mut roles: Vec<(String, String)> = volume
            .peers
            .iter()
            .map(|peer| (peer.node.clone(), peer.role.clone()))
            .collect();
        roles.sort();
        roles
    }

    /// Polls `ferroblock status` until `n1` and `n2` show these roles.
    fn wait_roles(&self, n1: &str, n2: &str) {
        let deadline = Instant::now() + WAIT;
        let wanted = vec![
            ("n1".to_string(), n1.to_string()),
            ("n2".to_string(), n2.to_string()),
        ];
        loop {
            let roles = self.roles();
            if roles == wanted {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "roles are {roles:?}, waited {WAIT:?} for {wanted:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until both peers report the same commit watermark (the slave holds everything).
    fn wait_in_sync(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let report = self.status();
            let volume = &report.volumes[0];
            let committed: Vec<Option<u64>> = volume.peers.iter().map(|p| p.committed).collect();
            if committed.iter().all(Option::is_some) && committed.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(Instant::now() < deadline, "peers never in sync: {volume:?}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `GET path` from a node's metrics endpoint (plain HTTP/1.0).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

fn qemu_io_refused(uri: &str) {
    require_tool("qemu-io");
    let out = run_bounded(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", uri]),
        DEADLINE,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("failed"),
        "{uri} should not be served here: {}",
        describe(&out)
    );
}

/// SIGKILL a node and reap it.
fn kill(node: &mut Server) {
    node.signal(libc::SIGKILL);
    node.wait_exit(DEADLINE);
}

/// An NBD trim through qemu-io (`-d unmap`: qemu-io drops discards otherwise).
fn discard(uri: &str, offset: &str, length: &str) {
    require_tool("qemu-io");
    let out = run_bounded(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-d",
            "unmap",
            "-c",
            &format!("discard {offset} {length}"),
            uri,
        ]),
        DEADLINE,
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io discard: {}",
        describe(&out)
    );
}

#[test]
fn master_and_slave_fail_over_both_ways_and_catch_up() {
    let cluster = Cluster::init("repl-failover");
    let mut n1 = cluster.start("n1");
    let mut n2 = cluster.start("n2");
    cluster.wait_roles("master", "slave");
    // Only the master offers the export.
    qemu_io_refused(&cluster.uri("n2"));

    // A: written through the master, acknowledged only once both copies committed it.
    qemu_io(
        &cluster.uri("n1"),
        &[
            "write -P 0xa1 0 1M",
            "write -P 0xa2 8M 64k",
            // Write-zeroes and trim replicate as notes too: over data, so that a copy that missed
            // them would still hold 0xa3 / 0xa4.
            "write -P 0xa3 12M 64k",
            "write -z 12M 64k",
            "write -P 0xa4 16M 64k",
        ],
    );
    discard(&cluster.uri("n1"), "16M", "64k");
    qemu_io(
        &cluster.uri("n1"),
        &["read -P 0xa1 0 1M", "read -P 0xa2 8M 64k"],
    );
    cluster.wait_in_sync();
    // The master's Prometheus endpoint shows its replication state: in sync, no lag.
    let metrics = http_get(cluster.base_port + 200, "/metrics");
    for line in [
        "ferroblock_replication_epoch{volume=\"vol0\",role=\"master\"} ",
        "ferroblock_replication_committed_op{volume=\"vol0\",role=\"master\"} ",
        "ferroblock_replication_peer_acked_op{volume=\"vol0\",role=\"master\"} ",
        "ferroblock_replication_lag_ops{volume=\"vol0\",role=\"master\"} 0\n",
    ] {
        assert!(
            metrics.contains(line),
            "no {line:?} in /metrics:\n{metrics}"
        );
    }

    // The master dies: the slave takes over with everything acknowledged.
    kill(&mut n1);
    cluster.wait_roles("offline", "solo-master");
    qemu_io(
        &cluster.uri("n2"),
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xa2 8M 64k",
            "read -P 0 12M 64k",
            "read -P 0 16M 64k",
        ],
    );
    // B: written while n1 is down.
    qemu_io(
        &cluster.uri("n2"),
        &["write -P 0xb1 512k 1M", "write -P 0xb2 20M 4k"],
    );

    // n1 returns: caught up by op number (the ops after its watermark), then paired as slave.
    let mut n1 = cluster.start("n1");
    cluster.wait_roles("slave", "master");
    cluster.wait_in_sync();
    qemu_io_refused(&cluster.uri("n1"));

    // The slave dies: the master goes on alone.
    kill(&mut n1);
    cluster.wait_roles("offline", "solo-master");
    qemu_io(&cluster.uri("n2"), &["write -P 0xc1 30M 128k"]);
    // It returns and catches up again.
    let _n1 = cluster.start("n1");
    cluster.wait_roles("slave", "master");
    cluster.wait_in_sync();

    // Now the other master dies: n1 serves A, B and C.
    kill(&mut n2);
    cluster.wait_roles("solo-master", "offline");
    qemu_io(
        &cluster.uri("n1"),
        &[
            "read -P 0xa1 0 512k",
            "read -P 0xb1 512k 1M",
            "read -P 0xa2 8M 64k",
            "read -P 0 12M 64k",
            "read -P 0 16M 64k",
            "read -P 0xb2 20M 4k",
            "read -P 0xc1 30M 128k",
        ],
    );
}

#[test]
fn master_killed_mid_write_loses_no_acknowledged_write() {
    require_python_libnbd();
    let cluster = Cluster::init("repl-crash");
    let mut n1 = cluster.start("n1");
    let _n2 = cluster.start("n2");
    cluster.wait_roles("master", "slave");
    let log = cluster._dir.join("writes.log");
    let mut writer = Command::new("/usr/bin/python3")
        .args([
            CLIENT,
            "write",
            &cluster.uri("n1"),
            log.to_str().unwrap(),
            "7",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the crash client");
    // Kill once a good number of writes were acknowledged (and more are in flight).
    let deadline = Instant::now() + WAIT;
    loop {
        let acked = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with('A'))
            .count();
        if acked >= 400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {acked} writes acknowledged"
        );
        thread::sleep(Duration::from_millis(20));
    }
    kill(&mut n1);
    let _ = wait_child(&mut writer, DEADLINE);
    cluster.wait_roles("offline", "solo-master");
    let out = run_bounded(
        Command::new("/usr/bin/python3").args([
            CLIENT,
            "verify",
            &cluster.uri("n2"),
            log.to_str().unwrap(),
        ]),
        DEADLINE,
    );
    assert!(
        out.status.success(),
        "verify on the new master: {}",
        describe(&out)
    );
}

const PROXY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cut_proxy.py");

/// A TCP proxy the test can cut (tests/cut_proxy.py): while cut, bytes vanish in both directions and
/// the connections stay open, as in a partition.
struct Proxy {
    address: String,
    cut_file: PathBuf,
    child: std::process::Child,
}

impl Proxy {
    fn start(dir: &Path, target_port: u16) -> Proxy {
        let port = free_base_port();
        let cut_file = dir.join("proxy.cut");
        let ready = dir.join("proxy.ready");
        let child = Command::new("python3")
            .args([PROXY, &port.to_string(), &target_port.to_string()])
            .arg(&cut_file)
            .arg(&ready)
            .spawn()
            .expect("start the proxy");
        let deadline = Instant::now() + WAIT;
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the proxy did not start");
            thread::sleep(Duration::from_millis(10));
        }
        Proxy {
            address: format!("127.0.0.1:{port}"),
            cut_file,
            child,
        }
    }

    fn cut(&self, cut: bool) {
        if cut {
            std::fs::write(&self.cut_file, b"").unwrap();
        } else {
            std::fs::remove_file(&self.cut_file).unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_cut_link_leaves_exactly_one_node_serving() {
    let cluster = Cluster::init("repl-cut");
    // n2 reaches n1's replication port through the proxy (the slave connects to the master).
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    let n1_replication = format!("127.0.0.1:{}", cluster.base_port + 100);
    let proxy = Proxy::start(cluster._dir.path(), cluster.base_port + 100);
    let n2_config = cluster.config.with_file_name("cluster-n2.toml");
    std::fs::write(
        &n2_config,
        text.replace(
            &format!("replication = \"{n1_replication}\""),
            &format!("replication = \"{}\"", proxy.address),
        ),
    )
    .unwrap();
    let _n1 = cluster.start("n1");
    let _n2 = cluster.start_with("n2", &n2_config);
    cluster.wait_roles("master", "slave");
    qemu_io(&cluster.uri("n1"), &["write -P 0xd1 0 256k"]);
    cluster.wait_in_sync();

    proxy.cut(true);
    // The master's lease runs out first: it goes on alone; the slave's takeover then loses the
    // compare-and-swap and it stops being a candidate.
    cluster.wait_roles("solo-master", "catching-up");
    qemu_io(
        &cluster.uri("n1"),
        &["write -P 0xd2 1M 256k", "read -P 0xd1 0 256k"],
    );
    qemu_io_refused(&cluster.uri("n2"));

    // Healed: the dropped peer catches up and they pair again.
    proxy.cut(false);
    cluster.wait_roles("master", "slave");
    cluster.wait_in_sync();
    qemu_io(&cluster.uri("n1"), &["read -P 0xd2 1M 256k"]);
}

/// The role `node` reports for vol0 (`None` when it is not in the report).
fn role_of(cluster: &Cluster, node: &str) -> Option<String> {
    cluster
        .roles()
        .into_iter()
        .find(|(name, _)| name == node)
        .map(|(_, role)| role)
}

/// The committed op a restart of the store at `path` would recover (read while its node runs: an
/// error, e.g. a journal block read while being written, is `None`, to be asked again).
fn recovered_op(path: &Path) -> Option<u64> {
    ferroblock::volume::open::open_copy(
        path,
        "vol0",
        None,
        false,
        ferroblock::volume::copy::Durability::Fdatasync,
        false,
        None,
    )
    .ok()
    .map(|opened| opened.copy.committed_op())
}

/// A master that crashed holding durable notes its slave never got comes back with ops of a history
/// the new master dropped (`ResetCopy`): it records its copy as incomplete, resets its store in place
/// and is caught up whole, with no operator, then pairs; what its slave never had is gone from it,
/// and every acknowledged write is on both copies.
#[test]
fn a_copy_holding_a_dropped_history_is_reset_in_place() {
    require_tool("qemu-io");
    let cluster = Cluster::init("repl-reset");
    let dir = cluster.config.parent().unwrap().to_path_buf();
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    // n2 reaches n1's replication port through the proxy: cut, n1's newest notes never reach n2.
    let n1_replication = format!("127.0.0.1:{}", cluster.base_port + 100);
    let proxy = Proxy::start(&dir, cluster.base_port + 100);
    let n2_config = dir.join("cluster-n2.toml");
    std::fs::write(
        &n2_config,
        text.replace(
            &format!("replication = \"{n1_replication}\""),
            &format!("replication = \"{}\"", proxy.address),
        ),
    )
    .unwrap();
    // n1 reaches the authority through a directory link the test redirects to an authority that
    // does not parse: n1 is then cut from the authority (it cannot go on alone), n2 is not.
    std::os::unix::fs::symlink(".", dir.join("authority-link")).unwrap();
    let n1_config = dir.join("cluster-n1.toml");
    let default_authority = "authority = \"authority.json\"";
    assert!(text.contains(default_authority), "{text}");
    std::fs::write(
        &n1_config,
        text.replace(
            default_authority,
            "authority = \"authority-link/authority.json\"",
        ),
    )
    .unwrap();

    let mut n1 = cluster.start_with("n1", &n1_config);
    let mut n2 = cluster.start_with("n2", &n2_config);
    cluster.wait_roles("master", "slave");
    // A: acknowledged, so on both copies.
    qemu_io(
        &cluster.uri("n1"),
        &["write -P 0xa1 0 1M", "write -P 0xa2 8M 64k"],
    );
    cluster.wait_in_sync();

    std::fs::create_dir(dir.join("unreachable")).unwrap();
    std::fs::write(dir.join("unreachable").join("authority.json"), b"{}").unwrap();
    std::os::unix::fs::symlink("unreachable", dir.join("authority-link.new")).unwrap();
    std::fs::rename(dir.join("authority-link.new"), dir.join("authority-link")).unwrap();
    proxy.cut(true);
    // B: over part of A, made durable on n1, never acknowledged (n2 never gets it).
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xbb 0 64k", &cluster.uri("n1")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    // n2 hears nothing from n1 and takes over; n1 is recorded as dropped at n2's watermark.
    let deadline = Instant::now() + WAIT;
    while role_of(&cluster, "n2").as_deref() != Some("solo-master") {
        assert!(Instant::now() < deadline, "n2 never took over");
        thread::sleep(Duration::from_millis(50));
    }
    let authority =
        ferroblock::cluster::authority::FileAuthority::open(&dir.join("authority.json")).unwrap();
    let membership = ferroblock::cluster::authority::Authority::read(&authority, "vol0")
        .unwrap()
        .expect("vol0 has a membership");
    let dropped = membership.dropped.expect("n1 is dropped");
    assert_eq!(
        (membership.master.as_str(), dropped.node.as_str()),
        ("n2", "n1")
    );
    // n1's store holds B durably: a restart recovers ops beyond the common op.
    let store = dir.join("n1").join("vol0.fbv");
    let deadline = Instant::now() + WAIT;
    while recovered_op(&store).is_none_or(|op| op <= dropped.common_op) {
        assert!(
            Instant::now() < deadline,
            "n1 never made B durable (common op {})",
            dropped.common_op
        );
        thread::sleep(Duration::from_millis(50));
    }
    kill(&mut n1);
    let _ = wait_child(&mut writer, DEADLINE);

    // n1 restarts (the real authority, the link healed): dropped below its watermark, it resets its
    // copy in place, is caught up whole and pairs.
    proxy.cut(false);
    let n1 = cluster.start("n1");
    cluster.wait_roles("slave", "master");
    cluster.wait_in_sync();
    let log = n1.stderr();
    assert!(
        log.contains("copy reset in place"),
        "n1 paired without a reset:\n{log}"
    );
    assert!(
        !dir.join("n1").join("vol0.catching-up").exists(),
        "the incomplete-copy marker outlived the catch-up"
    );
    // B is gone everywhere; A is on the master; C is written while paired.
    qemu_io(
        &cluster.uri("n2"),
        &["read -P 0xa1 0 1M", "read -P 0xa2 8M 64k"],
    );
    qemu_io(&cluster.uri("n2"), &["write -P 0xc1 4M 256k"]);
    cluster.wait_in_sync();

    // The reset copy is whole: n2 dies, n1 takes over and serves A and C, and never B.
    kill(&mut n2);
    cluster.wait_roles("solo-master", "offline");
    qemu_io(
        &cluster.uri("n1"),
        &[
            "read -P 0xa1 0 1M",
            "read -P 0xa2 8M 64k",
            "read -P 0xc1 4M 256k",
            "read -P 0 1M 3M",
        ],
    );
}
