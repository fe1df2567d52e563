//! The cluster configuration file (TOML): the nodes of a cluster, the volumes they replicate, and the
//! replication settings they share.
//!
//! Owns: the file's format, its defaults, and every check that a configuration must pass before a node
//! uses it. Must never: open sockets, touch a node's data or the authority, or accept a configuration it
//! cannot honour: each problem is an error naming the file and what is wrong.
//!
//! ```toml
//! [cluster]
//! # Shared secret of the replication handshake (HMAC), hex, at least 16 bytes.
//! secret = "5f0c...e1"                 # `ferroblock cluster init` writes 32 random bytes
//! authority = "authority.json"        # default; relative paths are relative to this file's directory
//! heartbeat_interval_ms = 100         # default
//! lease_timeout_ms = 500              # default; must be > heartbeat_interval_ms
//! takeover_timeout_ms = 1000          # default; must be > lease_timeout_ms
//!
//! [[nodes]]
//! id = "n1"                           # letters, digits, '.', '_', '-'
//! nbd = "127.0.0.1:10809"             # NBD clients
//! replication = "127.0.0.1:10909"     # replication links between peers
//! metrics = "127.0.0.1:11009"         # /metrics and /status (read by `ferroblock status`)
//! data_dir = "n1"                     # relative to this file's directory
//!
//! [[nodes]]
//! id = "n2"
//! nbd = "127.0.0.1:10810"
//! replication = "127.0.0.1:10910"
//! metrics = "127.0.0.1:11010"
//! data_dir = "n2"
//!
//! [[volumes]]
//! name = "vol0"
//! size = "1G"                         # bytes, or with a binary suffix K M G T P; a multiple of 512
//! peers = ["n1", "n2"]                # exactly two for now: the initial master, then the initial slave
//! ```
//!
//! Unknown keys are refused (a misspelt setting must not silently fall back to its default).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::{parse_size, parse_volume_name};

/// Default of `cluster.authority`, beside the configuration file.
pub const DEFAULT_AUTHORITY_FILE: &str = "authority.json";
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
pub const DEFAULT_LEASE_TIMEOUT_MS: u64 = 500;
pub const DEFAULT_TAKEOVER_TIMEOUT_MS: u64 = 1000;
/// Shortest shared secret accepted.
pub const SECRET_BYTES_MIN: usize = 16;
/// Peers per volume accepted for now: a master and a slave.
pub const PEERS_PER_VOLUME: usize = 2;

/// A whole cluster: settings, nodes, volumes. After `load`, paths are resolved against the file's
/// directory and every check has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSettings,
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub volumes: Vec<VolumeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Shared secret of the replication handshake's HMAC.
    pub secret: Secret,
    /// The authority file (membership and epoch of every volume).
    #[serde(default = "default_authority")]
    pub authority: PathBuf,
    /// How often a master and its slave exchange heartbeats.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A master serves only while its slave renewed the lease within this time.
    #[serde(default = "default_lease_timeout_ms")]
    pub lease_timeout_ms: u64,
    /// A slave asks the authority to take over after this long without its master (longer than the
    /// lease, so that the old master has stopped serving by then).
    #[serde(default = "default_takeover_timeout_ms")]
    pub takeover_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: String,
    /// NBD clients connect here.
    pub nbd: SocketAddr,
    /// Replication links between peers.
    pub replication: SocketAddr,
    /// HTTP endpoint with `/metrics` and `/status`.
    pub metrics: SocketAddr,
    /// The node's volume copies.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    #[serde(
        rename = "size",
        deserialize_with = "deserialize_size",
        serialize_with = "serialize_size"
    )]
    pub size_bytes: u64,
    /// Node ids: the initial master, then the initial slave.
    pub peers: Vec<String>,
}

/// A shared secret: bytes, written in the file as hex. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    /// `bytes` random bytes from the operating system.
    pub fn random(bytes: usize) -> Result<Secret, getrandom::Error> {
        let mut secret = vec![0u8; bytes];
        getrandom::fill(&mut secret)?;
        Ok(Secret(secret))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<Secret> {
        if !text.len().is_multiple_of(2) || !text.is_ascii() {
            return None;
        }
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()
            .map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        let text = String::deserialize(deserializer)?;
        Secret::from_hex(text.trim()).ok_or_else(|| {
            serde::de::Error::custom(
                "the secret must be an even number of hex digits (`ferroblock cluster init` generates one)",
            )
        })
    }
}

fn default_authority() -> PathBuf {
    PathBuf::from(DEFAULT_AUTHORITY_FILE)
}

fn default_heartbeat_interval_ms() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}

fn default_lease_timeout_ms() -> u64 {
    DEFAULT_LEASE_TIMEOUT_MS
}

fn default_takeover_timeout_ms() -> u64 {
    DEFAULT_TAKEOVER_TIMEOUT_MS
}

fn deserialize_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(i64),
        Text(String),
    }
    let text = match Size::deserialize(deserializer).map_err(|_| {
        serde::de::Error::custom("a size is a number of bytes or a string like \"512M\" or \"1G\"")
    })? {
        Size::Bytes(bytes) => bytes.to_string(),
        Size::Text(text) => text,
    };
    parse_size(&text).map_err(serde::de::Error::custom)
}

/// Writes a size with the largest binary suffix that divides it ("1G"), or as bytes.
fn serialize_size<S: Serializer>(size_bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    let size_bytes = *size_bytes;
    for (shift, suffix) in [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if size_bytes != 0 && size_bytes.is_multiple_of(1 << shift) {
            return serializer.serialize_str(&format!("{}{suffix}", size_bytes >> shift));
        }
    }
    serializer.serialize_str(&size_bytes.to_string())
}

/// Why a cluster configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("cannot read cluster config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster config {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("cluster config {}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        problem: Box<ConfigProblem>,
    },
}

/// What is wrong with a configuration that parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    #[error("no nodes: list at least one [[nodes]]")]
    NoNodes,
    #[error(
        "node id {0:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadNodeId(String),
    #[error("node id {0:?} is used twice")]
    DuplicateNodeId(String),
    #[error(
        "address {address} is used twice: by node {first} ({first_use}) and node {second} ({second_use})"
    )]
    DuplicateAddress {
        address: SocketAddr,
        first: String,
        first_use: &'static str,
        second: String,
        second_use: &'static str,
    },
    #[error("volume {0:?}: {1}")]
    BadVolumeName(String, String),
    #[error("volume {0:?} is listed twice")]
    DuplicateVolume(String),
    #[error("volume {volume:?}: peer {peer:?} is not a node of this cluster")]
    UnknownPeer { volume: String, peer: String },
    #[error("volume {volume:?}: peer {peer:?} is listed twice")]
    DuplicatePeer { volume: String, peer: String },
    #[error(
        "volume {volume:?} has {count} peers: exactly {PEERS_PER_VOLUME} are supported (the initial master, then the initial slave)"
    )]
    PeerCount { volume: String, count: usize },
    #[error("heartbeat_interval_ms must be at least 1")]
    HeartbeatZero,
    #[error(
        "lease_timeout_ms ({lease_timeout_ms}) must be longer than heartbeat_interval_ms ({heartbeat_interval_ms})"
    )]
    LeaseNotAfterHeartbeat {
        lease_timeout_ms: u64,
        heartbeat_interval_ms: u64,
    },
    #[error(
        "takeover_timeout_ms ({takeover_timeout_ms}) must be longer than lease_timeout_ms ({lease_timeout_ms}): a slave must not take over while the old master may still serve"
    )]
    TakeoverNotAfterLease {
        takeover_timeout_ms: u64,
        lease_timeout_ms: u64,
    },
    #[error("the secret has {bytes} bytes: at least {SECRET_BYTES_MIN} are required")]
    SecretTooShort { bytes: usize },
}

impl ClusterConfig {
    /// Reads, parses and checks `path`; relative paths in it are resolved against its directory.
    pub fn load(path: &Path) -> Result<ClusterConfig, ClusterConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        ClusterConfig::parse(&text, base).map_err(|error| match error {
            ParseError::Syntax(message) => ClusterConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ParseError::Invalid(problem) => ClusterConfigError::Invalid {
                path: path.to_owned(),
                problem: Box::new(problem),
            },
        })
    }

    /// Parses and checks TOML text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<ClusterConfig, ParseError> {
        let mut config: ClusterConfig =
            toml::from_str(text).map_err(|error| ParseError::Syntax(error.to_string()))?;
        config.validate().map_err(ParseError::Invalid)?;
        config.cluster.authority = base.join(&config.cluster.authority);
        for node in &mut config.nodes {
            node.data_dir = base.join(&node.data_dir);
        }
        Ok(config)
    }

    /// The file's text (paths as they are in `self`).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Every check a configuration must pass.
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        let settings = &self.cluster;
        if settings.secret.as_bytes().len() < SECRET_BYTES_MIN {
            return Err(ConfigProblem::SecretTooShort {
                bytes: settings.secret.as_bytes().len(),
            });
        }
        if settings.heartbeat_interval_ms == 0 {
            return Err(ConfigProblem::HeartbeatZero);
        }
        if settings.lease_timeout_ms <= settings.heartbeat_interval_ms {
            return Err(ConfigProblem::LeaseNotAfterHeartbeat {
                lease_timeout_ms: settings.lease_timeout_ms,
                heartbeat_interval_ms: settings.heartbeat_interval_ms,
            });
        }
        if settings.takeover_timeout_ms <= settings.lease_timeout_ms {
            return Err(ConfigProblem::TakeoverNotAfterLease {
                takeover_timeout_ms: settings.takeover_timeout_ms,
                lease_timeout_ms: settings.lease_timeout_ms,
            });
        }
        if self.nodes.is_empty() {
            return Err(ConfigProblem::NoNodes);
        }
        let mut addresses: HashMap<SocketAddr, (&str, &'static str)> = HashMap::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if !is_valid_node_id(&node.id) {
                return Err(ConfigProblem::BadNodeId(node.id.clone()));
            }
            if self.nodes[..index].iter().any(|other| other.id == node.id) {
                return Err(ConfigProblem::DuplicateNodeId(node.id.clone()));
            }
            for (address, what) in [
                (node.nbd, "nbd"),
                (node.replication, "replication"),
                (node.metrics, "metrics"),
            ] {
                if let Some((first, first_use)) = addresses.insert(address, (&node.id, what)) {
                    return Err(ConfigProblem::DuplicateAddress {
                        address,
                        first: first.to_owned(),
                        first_use,
                        second: node.id.clone(),
                        second_use: what,
                    });
                }
            }
        }
        for (index, volume) in self.volumes.iter().enumerate() {
            parse_volume_name(&volume.name)
                .map_err(|message| ConfigProblem::BadVolumeName(volume.name.clone(), message))?;
            if self.volumes[..index]
                .iter()
                .any(|other| other.name == volume.name)
            {
                return Err(ConfigProblem::DuplicateVolume(volume.name.clone()));
            }
            for (at, peer) in volume.peers.iter().enumerate() {
                if self.node(peer).is_none() {
                    return Err(ConfigProblem::UnknownPeer {
                        volume: volume.name.clone(),
                        peer: peer.clone(),
                    });
                }
                if volume.peers[..at].contains(peer) {
                    return Err(ConfigProblem::DuplicatePeer {
                        volume: volume.name.clone(),
                        peer: peer.clone(),
                    });
                }
            }
            if volume.peers.len() != PEERS_PER_VOLUME {
                return Err(ConfigProblem::PeerCount {
                    volume: volume.name.clone(),
                    count: volume.peers.len(),
                });
            }
        }
        Ok(())
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|node| node.id == id)
    }

    /// The volume with this name.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|volume| volume.name == name)
    }

    /// The volumes that have a peer on node `id`.
    pub fn volumes_of(&self, id: &str) -> impl Iterator<Item = &VolumeConfig> {
        self.volumes
            .iter()
            .filter(move |volume| volume.peers.iter().any(|peer| peer == id))
    }
}

/// Why text did not make a configuration (without the file name: `load` adds it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Invalid(ConfigProblem),
}

/// Node ids: like volume names, at most 64 bytes.
pub fn is_valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "00112233445566778899aabbccddeeff";

    fn node(id: &str, port: u16) -> String {
        format!(
            "[[nodes]]\nid = \"{id}\"\nnbd = \"127.0.0.1:{port}\"\nreplication = \"127.0.0.1:{}\"\n\
             metrics = \"127.0.0.1:{}\"\ndata_dir = \"{id}\"\n",
            port + 100,
            port + 200
        )
    }

    fn text(cluster_extra: &str, volumes: &str) -> String {
        format!(
            "[cluster]\nsecret = \"{SECRET}\"\n{cluster_extra}\n{}{}{volumes}",
            node("n1", 10809),
            node("n2", 10810)
        )
    }

    const VOLUME: &str = "[[volumes]]\nname = \"vol0\"\nsize = \"1G\"\npeers = [\"n1\", \"n2\"]\n";

    fn problem(text: &str) -> ConfigProblem {
        match ClusterConfig::parse(text, Path::new("/etc/fb")) {
            Err(ParseError::Invalid(problem)) => problem,
            other => panic!("expected a validation problem, got {other:?}"),
        }
    }

    fn syntax(text: &str) -> String {
        match ClusterConfig::parse(text, Path::new("/etc/fb")) {
            Err(ParseError::Syntax(message)) => message,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_config_parses_with_defaults_and_resolved_paths() {
        let config = ClusterConfig::parse(&text("", VOLUME), Path::new("/etc/fb")).unwrap();
        assert_eq!(config.cluster.secret.as_bytes().len(), 16);
        assert_eq!(
            config.cluster.authority,
            Path::new("/etc/fb/authority.json")
        );
        assert_eq!(config.cluster.heartbeat_interval_ms, 100);
        assert_eq!(config.cluster.lease_timeout_ms, 500);
        assert_eq!(config.cluster.takeover_timeout_ms, 1000);
        let n2 = config.node("n2").unwrap();
        assert_eq!(n2.nbd, "127.0.0.1:10810".parse().unwrap());
        assert_eq!(n2.replication, "127.0.0.1:10910".parse().unwrap());
        assert_eq!(n2.metrics, "127.0.0.1:11010".parse().unwrap());
        assert_eq!(n2.data_dir, Path::new("/etc/fb/n2"));
        assert!(config.node("n3").is_none());
        let volume = config.volume("vol0").unwrap();
        assert_eq!(volume.size_bytes, 1 << 30);
        assert_eq!(volume.peers, ["n1", "n2"]);
        assert_eq!(config.volumes_of("n2").count(), 1);
    }

    #[test]
    fn absolute_paths_and_byte_sizes_are_kept() {
        let volumes = "[[volumes]]\nname = \"v\"\nsize = 1048576\npeers = [\"n2\", \"n1\"]\n";
        let config = ClusterConfig::parse(
            &text("authority = \"/var/lib/fb/auth.json\"", volumes),
            Path::new("/etc/fb"),
        )
        .unwrap();
        assert_eq!(config.cluster.authority, Path::new("/var/lib/fb/auth.json"));
        assert_eq!(config.volumes[0].size_bytes, 1 << 20);
    }

    #[test]
    fn written_config_reads_back_the_same() {
        let config = ClusterConfig::parse(&text("", VOLUME), Path::new("")).unwrap();
        let written = config.to_toml().unwrap();
        assert!(written.contains("size = \"1G\""), "{written}");
        assert!(written.contains(SECRET), "{written}");
        let again = ClusterConfig::parse(&written, Path::new("")).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let config = ClusterConfig::parse(&text("", VOLUME), Path::new("")).unwrap();
        assert!(!format!("{config:?}").contains(SECRET));
    }

    #[test]
    fn duplicate_node_ids_are_refused() {
        let doubled = format!("{}{}", text("", VOLUME), node("n1", 20000));
        assert_eq!(
            problem(&doubled),
            ConfigProblem::DuplicateNodeId("n1".into())
        );
    }

    #[test]
    fn duplicate_addresses_are_refused() {
        // n3's NBD port is n1's replication port.
        let clash = format!("{}{}", text("", VOLUME), node("n3", 10909));
        match problem(&clash) {
            ConfigProblem::DuplicateAddress {
                address,
                first,
                first_use,
                second,
                second_use,
            } => {
                assert_eq!(address, "127.0.0.1:10909".parse().unwrap());
                assert_eq!((first.as_str(), first_use), ("n1", "replication"));
                assert_eq!((second.as_str(), second_use), ("n3", "nbd"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_and_repeated_peers_are_refused() {
        let unknown = VOLUME.replace("\"n2\"]", "\"n9\"]");
        assert_eq!(
            problem(&text("", &unknown)),
            ConfigProblem::UnknownPeer {
                volume: "vol0".into(),
                peer: "n9".into()
            }
        );
        let repeated = VOLUME.replace("\"n2\"]", "\"n1\"]");
        assert_eq!(
            problem(&text("", &repeated)),
            ConfigProblem::DuplicatePeer {
                volume: "vol0".into(),
                peer: "n1".into()
            }
        );
    }

    #[test]
    fn volumes_need_exactly_two_peers() {
        for (peers, count) in [("[\"n1\"]", 1), ("[]", 0)] {
            let volume = VOLUME.replace("[\"n1\", \"n2\"]", peers);
            assert_eq!(
                problem(&text("", &volume)),
                ConfigProblem::PeerCount {
                    volume: "vol0".into(),
                    count
                }
            );
        }
        let three = format!(
            "{}{}",
            text("", &VOLUME.replace("\"n2\"]", "\"n2\", \"n3\"]")),
            node("n3", 20000)
        );
        assert_eq!(
            problem(&three),
            ConfigProblem::PeerCount {
                volume: "vol0".into(),
                count: 3
            }
        );
    }

    #[test]
    fn duplicate_and_bad_volume_names_are_refused() {
        let twice = format!("{VOLUME}{VOLUME}");
        assert_eq!(
            problem(&text("", &twice)),
            ConfigProblem::DuplicateVolume("vol0".into())
        );
        let bad = VOLUME.replace("vol0", "../x");
        assert!(matches!(
            problem(&text("", &bad)),
            ConfigProblem::BadVolumeName(name, _) if name == "../x"
        ));
    }

    #[test]
    fn bad_node_ids_are_refused() {
        let bad = text("", VOLUME).replace("id = \"n1\"", "id = \"a b\"");
        assert_eq!(problem(&bad), ConfigProblem::BadNodeId("a b".into()));
    }

    #[test]
    fn timeouts_must_be_ordered() {
        assert_eq!(
            problem(&text("lease_timeout_ms = 1000", VOLUME)),
            ConfigProblem::TakeoverNotAfterLease {
                takeover_timeout_ms: 1000,
                lease_timeout_ms: 1000
            }
        );
        assert_eq!(
            problem(&text("heartbeat_interval_ms = 500", VOLUME)),
            ConfigProblem::LeaseNotAfterHeartbeat {
                lease_timeout_ms: 500,
                heartbeat_interval_ms: 500
            }
        );
        assert_eq!(
            problem(&text("heartbeat_interval_ms = 0", VOLUME)),
            ConfigProblem::HeartbeatZero
        );
    }

    #[test]
    fn short_or_malformed_secrets_are_refused() {
        let short = text("", VOLUME).replace(SECRET, "0011223344556677");
        assert_eq!(problem(&short), ConfigProblem::SecretTooShort { bytes: 8 });
        let not_hex = text("", VOLUME).replace(SECRET, "correct horse battery staple!!");
        assert!(syntax(&not_hex).contains("hex"));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for size in ["\"12Q\"", "\"1000\"", "0", "-4096", "\"\"", "1.5", "true"] {
            let volume = VOLUME.replace("\"1G\"", size);
            let message = syntax(&text("", &volume));
            assert!(
                message.contains("size") || message.contains(size.trim_matches('"')),
                "{size}: {message}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let message = syntax(&text("leese_timeout_ms = 700", VOLUME));
        assert!(message.contains("leese_timeout_ms"), "{message}");
        let message = syntax(&text("", &VOLUME.replace("size", "sise")));
        assert!(message.contains("sise"), "{message}");
        let message = syntax(&format!("{}[extra]\nx = 1\n", text("", VOLUME)));
        assert!(message.contains("extra"), "{message}");
    }

    #[test]
    fn missing_settings_are_refused() {
        let message = syntax(&text("", VOLUME).replace(&format!("secret = \"{SECRET}\""), ""));
        assert!(message.contains("secret"), "{message}");
        assert_eq!(
            problem(&format!("nodes = []\n[cluster]\nsecret = \"{SECRET}\"\n")),
            ConfigProblem::NoNodes
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("fb-cluster-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        std::fs::write(&path, text("takeover_timeout_ms = 10", VOLUME)).unwrap();
        let error = ClusterConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("takeover_timeout_ms"), "{error}");
        std::fs::write(&path, "[cluster\n").unwrap();
        let error = ClusterConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        let missing = dir.join("missing.toml");
        let error = ClusterConfig::load(&missing).unwrap_err().to_string();
        assert!(error.contains("missing.toml"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
