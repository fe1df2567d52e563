//! The cluster subcommands: `ferroblock cluster init` (write a local cluster's configuration and its
//! authority) and `ferroblock status` (show each volume's membership and its peers' live state).
//!
//! Owns: their flags, the layout `cluster init` writes, and their exit codes (0 done; 1 an IO, config
//! or authority error; 2 a usage error or a refusal to overwrite). Must never: overwrite an existing
//! cluster configuration or authority without `--force`, or touch a node's data directory beyond
//! creating it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::cluster::authority::{Authority, AuthorityError, FileAuthority, Membership};
use crate::cluster::config::{
    ClusterConfig, ClusterConfigError, ClusterSettings, DEFAULT_AUTHORITY_FILE,
    DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_LEASE_TIMEOUT_MS, DEFAULT_TAKEOVER_TIMEOUT_MS,
    NodeConfig, ParseError, Secret, VolumeConfig,
};
use crate::cluster::report::{build_report, fetch_all, render_table};

/// Name of the configuration file `cluster init` writes.
pub const CLUSTER_FILE: &str = "cluster.toml";
/// Bytes of the secret `cluster init` generates.
pub const GENERATED_SECRET_BYTES: usize = 32;
/// The volume `cluster init` configures, and its size.
pub const INIT_VOLUME: &str = "vol0";
pub const INIT_VOLUME_SIZE_BYTES: u64 = 1 << 30;
/// Port offsets from `--base-port` of node nK's (K from 1) replication and metrics addresses; its NBD
/// port is base + K - 1. `--nodes` is at most `REPLICATION_PORT_OFFSET`, so the ranges never overlap.
pub const REPLICATION_PORT_OFFSET: u16 = 100;
pub const METRICS_PORT_OFFSET: u16 = 200;
/// How long `status` waits for each node (connect, and each read and write).
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Write DIR/cluster.toml for a cluster on 127.0.0.1 (node nK: NBD on port P+K-1, replication on
    /// P+100+K-1, metrics on P+200+K-1, data in DIR/nK; volume vol0 of 1 GiB with master n1 and slave
    /// n2) and the authority DIR/authority.json with vol0 at epoch 1.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory for cluster.toml, the authority and the nodes' data directories (created if missing).
    pub dir: PathBuf,

    /// Number of nodes (2 to 100).
    #[arg(long, value_parser = clap::value_parser!(u16).range(2..=i64::from(REPLICATION_PORT_OFFSET)))]
    pub nodes: u16,

    /// First port: node nK serves NBD on BASE_PORT+K-1.
    #[arg(long, default_value_t = 10809, value_parser = clap::value_parser!(u16).range(1..))]
    pub base_port: u16,

    /// Overwrite an existing cluster.toml and reset the authority (every volume back to epoch 1).
    /// Data directories are kept.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The cluster configuration (cluster.toml).
    #[arg(long)]
    pub config: PathBuf,

    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Why `cluster init` did not finish.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{} exists; pass --force to overwrite it (and reset the authority)", path.display())]
    Exists { path: PathBuf },
    #[error(
        "--base-port {base_port} with --nodes {nodes}: the metrics port of the last node would be {last}, above 65535"
    )]
    PortsOutOfRange {
        base_port: u16,
        nodes: u16,
        last: u32,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot get random bytes for the secret: {0}")]
    Secret(getrandom::Error),
    #[error("cannot encode the configuration: {0}")]
    Encode(#[from] toml::ser::Error),
    #[error("the generated configuration is invalid (a bug): {0}")]
    Invalid(Box<ParseError>),
    #[error("the written configuration does not load (a bug): {0}")]
    Reload(#[from] ClusterConfigError),
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

impl InitError {
    /// 2 for refusals and usage errors, 1 for failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            InitError::Exists { .. } | InitError::PortsOutOfRange { .. } => 2,
            _ => 1,
        }
    }
}

/// What `cluster init` wrote.
#[derive(Debug)]
pub struct InitOutcome {
    pub config_path: PathBuf,
    pub config: ClusterConfig,
}

/// The configuration `cluster init` writes, with paths relative to its directory.
pub fn local_cluster(
    nodes: u16,
    base_port: u16,
    secret: Secret,
) -> Result<ClusterConfig, InitError> {
    let last = u32::from(base_port) + u32::from(METRICS_PORT_OFFSET) + u32::from(nodes) - 1;
    if nodes == 0 || last > u32::from(u16::MAX) {
        return Err(InitError::PortsOutOfRange {
            base_port,
            nodes,
            last,
        });
    }
    let address = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let nodes: Vec<NodeConfig> = (0..nodes)
        .map(|index| NodeConfig {
            id: format!("n{}", index + 1),
            nbd: address(base_port + index),
            replication: address(base_port + REPLICATION_PORT_OFFSET + index),
            metrics: address(base_port + METRICS_PORT_OFFSET + index),
            data_dir: PathBuf::from(format!("n{}", index + 1)),
        })
        .collect();
    Ok(ClusterConfig {
        cluster: ClusterSettings {
            secret,
            authority: PathBuf::from(DEFAULT_AUTHORITY_FILE),
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            lease_timeout_ms: DEFAULT_LEASE_TIMEOUT_MS,
            takeover_timeout_ms: DEFAULT_TAKEOVER_TIMEOUT_MS,
        },
        volumes: vec![VolumeConfig {
            name: INIT_VOLUME.into(),
            size_bytes: INIT_VOLUME_SIZE_BYTES,
            peers: vec![nodes[0].id.clone(), nodes[1].id.clone()],
        }],
        nodes,
    })
}

/// `ferroblock cluster init`: writes `dir/cluster.toml` (mode 0600: it holds the secret), creates the
/// nodes' data directories and the authority with every volume at epoch 1.
pub fn init(dir: &Path, nodes: u16, base_port: u16, force: bool) -> Result<InitOutcome, InitError> {
    let secret = Secret::random(GENERATED_SECRET_BYTES).map_err(InitError::Secret)?;
    let config = local_cluster(nodes, base_port, secret)?;
    let config_path = dir.join(CLUSTER_FILE);
    let authority_path = dir.join(&config.cluster.authority);
    if !force {
        for path in [&config_path, &authority_path] {
            if path.exists() {
                return Err(InitError::Exists { path: path.clone() });
            }
        }
    }
    let text = format!(
        "# ferroblock cluster configuration, written by `ferroblock cluster init`.\n\
         # Relative paths are relative to this file's directory. Format: see README.md.\n\n{}",
        config.to_toml()?
    );
    // Check before writing anything.
    ClusterConfig::parse(&text, dir).map_err(|error| InitError::Invalid(Box::new(error)))?;

    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| InitError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for node in &config.nodes {
        let data_dir = dir.join(&node.data_dir);
        std::fs::create_dir_all(&data_dir).map_err(io_error(&data_dir))?;
    }
    let temp_path = dir.join(format!("{CLUSTER_FILE}.tmp"));
    // A leftover from an interrupted init might have looser permissions; the mode applies on creation.
    let _ = std::fs::remove_file(&temp_path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp_path)
        .map_err(io_error(&temp_path))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(&temp_path))?;
    drop(file);
    std::fs::rename(&temp_path, &config_path).map_err(io_error(&config_path))?;

    let authority = FileAuthority::create(&authority_path, force)?;
    for volume in &config.volumes {
        let membership = Membership {
            epoch: 1,
            master: volume.peers[0].clone(),
            slave: volume.peers.get(1).cloned(),
            dropped: None,
        };
        // A fresh file has no memberships, so this cannot conflict.
        authority.compare_and_swap(&volume.name, 0, &membership)?;
    }
    let config = ClusterConfig::load(&config_path)?;
    Ok(InitOutcome {
        config_path,
        config,
    })
}

/// Why `serve --config FILE --node ID` was refused before starting (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ServeNodeError {
    #[error("--config: {0}")]
    Config(#[from] ClusterConfigError),
    #[error("--node {node:?} is not a node of {} (its nodes: {})", path.display(), known.join(", "))]
    UnknownNode {
        path: PathBuf,
        node: String,
        known: Vec<String>,
    },
}

/// `serve --config FILE --node ID`: loads the cluster and checks that `node` is one of its nodes.
pub fn load_serve_node(path: &Path, node: &str) -> Result<ClusterConfig, ServeNodeError> {
    let config = ClusterConfig::load(path)?;
    if config.node(node).is_none() {
        return Err(ServeNodeError::UnknownNode {
            path: path.to_owned(),
            node: node.to_owned(),
            known: config.nodes.iter().map(|node| node.id.clone()).collect(),
        });
    }
    Ok(config)
}

/// `ferroblock cluster ...`.
pub fn run_cluster(args: ClusterArgs) -> ExitCode {
    match args.command {
        ClusterCommand::Init(args) => match init(&args.dir, args.nodes, args.base_port, args.force)
        {
            Ok(outcome) => {
                let config = &outcome.config;
                println!(
                    "ferroblock: wrote {} ({} nodes) and the authority {}",
                    outcome.config_path.display(),
                    config.nodes.len(),
                    config.cluster.authority.display()
                );
                for volume in &config.volumes {
                    println!(
                        "ferroblock: volume {} ({} bytes): master {}, slave {}, epoch 1",
                        volume.name, volume.size_bytes, volume.peers[0], volume.peers[1]
                    );
                }
                for node in &config.nodes {
                    println!(
                        "ferroblock: node {}: nbd {} replication {} metrics {} data {}",
                        node.id,
                        node.nbd,
                        node.replication,
                        node.metrics,
                        node.data_dir.display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("ferroblock: cluster init: {error}");
                ExitCode::from(error.exit_code())
            }
        },
    }
}

/// `ferroblock status`: 0 even when nodes are offline; 1 when the config or the authority cannot be
/// read.
pub fn run_status(args: StatusArgs) -> ExitCode {
    let config = match ClusterConfig::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ferroblock: {error}");
            return ExitCode::from(1);
        }
    };
    let memberships = match FileAuthority::open(&config.cluster.authority)
        .and_then(|authority| authority.read_all())
    {
        Ok(memberships) => memberships,
        Err(error) => {
            eprintln!("ferroblock: {error}");
            return ExitCode::from(1);
        }
    };
    let statuses = fetch_all(&config, STATUS_TIMEOUT);
    let report = build_report(&config, &memberships, &statuses);
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("ferroblock: encoding the status: {error}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", render_table(&report));
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "fb-cluster-init-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        path
    }

    #[test]
    fn init_writes_a_config_that_loads_and_an_authority_at_epoch_1() {
        let dir = temp_dir("roundtrip");
        let outcome = init(&dir, 3, 20000, false).unwrap();
        let config = ClusterConfig::load(&dir.join(CLUSTER_FILE)).unwrap();
        assert_eq!(config, outcome.config);
        assert_eq!(
            config.cluster.secret.as_bytes().len(),
            GENERATED_SECRET_BYTES
        );
        assert_eq!(config.cluster.authority, dir.join("authority.json"));
        let n3 = config.node("n3").unwrap();
        assert_eq!(n3.nbd.port(), 20002);
        assert_eq!(n3.replication.port(), 20102);
        assert_eq!(n3.metrics.port(), 20202);
        assert_eq!(n3.data_dir, dir.join("n3"));
        assert!(n3.data_dir.is_dir());
        let volume = config.volume("vol0").unwrap();
        assert_eq!(volume.size_bytes, 1 << 30);
        assert_eq!(volume.peers, ["n1", "n2"]);
        let authority = FileAuthority::open(&config.cluster.authority).unwrap();
        assert_eq!(
            authority.read("vol0").unwrap(),
            Some(Membership {
                epoch: 1,
                master: "n1".into(),
                slave: Some("n2".into()),
                dropped: None
            })
        );
        // Two inits never share a secret.
        let other = local_cluster(2, 1, Secret::random(32).unwrap()).unwrap();
        assert_ne!(other.cluster.secret, config.cluster.secret);

        assert!(matches!(
            init(&dir, 2, 20000, false),
            Err(error @ InitError::Exists { .. }) if error.exit_code() == 2
        ));
        init(&dir, 2, 30000, true).unwrap();
        let config = ClusterConfig::load(&dir.join(CLUSTER_FILE)).unwrap();
        assert_eq!(config.nodes.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ports_past_65535_are_refused() {
        let secret = Secret::random(32).unwrap();
        assert!(local_cluster(2, 65334, secret.clone()).is_ok());
        let error = local_cluster(3, 65334, secret).unwrap_err();
        assert!(matches!(
            error,
            InitError::PortsOutOfRange { last: 65536, .. }
        ));
        assert_eq!(error.exit_code(), 2);
    }
}
