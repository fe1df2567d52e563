//! Live counters and latency histograms, and their Prometheus text exposition.
//!
//! Owns: per-volume request counts, bytes, errors, in-flight gauge, latency histograms and op numbers;
//! per-reactor loop iterations and busy/idle time; the `--metrics` HTTP endpoint, which also serves a
//! node's replication state at `/status` (JSON, from an attached `cluster::status::StatusBoard`).
//! Writers are the reactors (relaxed atomic adds: no locks, no allocation on the IO path); the reader is
//! the endpoint's own thread. Must never: block a reactor, or let a scraper's bytes do anything but get
//! a page or an error.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::cluster::status::StatusBoard;
use crate::volume::IoKind;
use crate::volume::copy::CopyStats;

/// Histogram buckets: upper bounds 2^10 ns (~1 µs) .. 2^32 ns (~4.3 s), then +Inf.
const BUCKET_FIRST_SHIFT: u32 = 10;
const BUCKETS: usize = 23;
/// Largest HTTP request the endpoint reads.
const REQUEST_BYTES_MAX: usize = 8192;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

const KINDS: [(IoKind, &str); 7] = [
    (IoKind::Read, "read"),
    (IoKind::Write, "write"),
    (IoKind::Flush, "flush"),
    (IoKind::Trim, "trim"),
    (IoKind::WriteZeroes, "write_zeroes"),
    (IoKind::Cache, "cache"),
    (IoKind::BlockStatus, "block_status"),
];

fn kind_index(kind: IoKind) -> usize {
    KINDS
        .iter()
        .position(|(candidate, _)| *candidate == kind)
        .expect("every kind is listed")
}

/// A fixed-bucket latency histogram that many threads may update and one may read.
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, nanoseconds: u64) {
        let bits = 64 - nanoseconds.saturating_sub(1).leading_zeros();
        let index = (bits.saturating_sub(BUCKET_FIRST_SHIFT) as usize).min(BUCKETS);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(nanoseconds, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        for (index, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let bound = if index == BUCKETS {
                "+Inf".to_string()
            } else {
                format!(
                    "{:e}",
                    (1u64 << (BUCKET_FIRST_SHIFT + index as u32)) as f64 / 1e9
                )
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// One volume's counters.
pub struct VolumeMetrics {
    pub name: String,
    requests: [AtomicU64; KINDS.len()],
    bytes: [AtomicU64; KINDS.len()],
    errors: [AtomicU64; KINDS.len()],
    in_flight: AtomicI64,
    latency_read: LatencyHistogram,
    latency_write: LatencyHistogram,
    latency_flush: LatencyHistogram,
    next_op: AtomicU64,
    committed_op: AtomicU64,
    /// Persistent volumes: device syncs (fdatasync) issued, journal and data bytes written.
    syncs: AtomicU64,
    journal_bytes: AtomicU64,
    data_bytes: AtomicU64,
    notes: AtomicU64,
    inline_notes: AtomicU64,
    data_writes: AtomicU64,
    home_writes: AtomicU64,
    checkpoints: AtomicU64,
}

impl VolumeMetrics {
    pub fn new(name: &str) -> VolumeMetrics {
        VolumeMetrics {
            name: name.to_owned(),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight: AtomicI64::new(0),
            latency_read: LatencyHistogram::default(),
            latency_write: LatencyHistogram::default(),
            latency_flush: LatencyHistogram::default(),
            next_op: AtomicU64::new(0),
            committed_op: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            data_bytes: AtomicU64::new(0),
            notes: AtomicU64::new(0),
            inline_notes: AtomicU64::new(0),
            data_writes: AtomicU64::new(0),
            home_writes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
        }
    }

    /// A request was handed to the volume.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished (successfully or not) after `nanoseconds`.
    pub fn finished(&self, kind: IoKind, bytes: u32, ok: bool, nanoseconds: u64) {
        let index = kind_index(kind);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.requests[index].fetch_add(1, Ordering::Relaxed);
        if ok {
            self.bytes[index].fetch_add(u64::from(bytes), Ordering::Relaxed);
        } else {
            self.errors[index].fetch_add(1, Ordering::Relaxed);
        }
        match kind {
            IoKind::Read => self.latency_read.record(nanoseconds),
            IoKind::Write | IoKind::WriteZeroes | IoKind::Trim => {
                self.latency_write.record(nanoseconds)
            }
            IoKind::Flush => self.latency_flush.record(nanoseconds),
            IoKind::Cache | IoKind::BlockStatus => {}
        }
    }

    /// Op numbers of a persistent volume (the next to assign, and the commit watermark).
    /// A persistent volume copy's op numbers and store counters.
    pub fn set_copy_stats(&self, stats: &CopyStats) {
        self.next_op.store(stats.next_op, Ordering::Relaxed);
        self.committed_op
            .store(stats.committed_op, Ordering::Relaxed);
        self.syncs.store(stats.syncs, Ordering::Relaxed);
        self.journal_bytes
            .store(stats.journal_bytes_written, Ordering::Relaxed);
        self.data_bytes
            .store(stats.data_bytes_written, Ordering::Relaxed);
        self.notes.store(stats.notes_created, Ordering::Relaxed);
        self.inline_notes
            .store(stats.inline_notes, Ordering::Relaxed);
        self.data_writes.store(stats.data_writes, Ordering::Relaxed);
        self.home_writes.store(stats.home_writes, Ordering::Relaxed);
        self.checkpoints.store(stats.checkpoints, Ordering::Relaxed);
    }
}

/// A metric family: name, help text, and how to read its value from one source.
type Family<Source, Value> = (&'static str, &'static str, fn(&Source) -> Value);

/// One reactor's loop accounting.
#[derive(Default)]
pub struct ReactorMetrics {
    pub iterations: AtomicU64,
    /// Time spent waiting for events with a non-zero timeout (asleep).
    pub idle_ns: AtomicU64,
    /// Everything else: work and busy polling.
    pub busy_ns: AtomicU64,
}

/// Writes one sample per volume of each family, of Prometheus type `kind`.
fn render_per_volume<Value: std::fmt::Display>(
    out: &mut String,
    kind: &str,
    families: &[Family<VolumeMetrics, Value>],
    volumes: &[VolumeMetrics],
) {
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for volume in volumes {
            let _ = writeln!(
                out,
                "{name}{{volume=\"{}\"}} {}",
                volume.name,
                value(volume)
            );
        }
    }
}

/// One replication gauge's value for a volume, if it has one.
type ReplicationGauge = fn(&crate::cluster::status::VolumeStatus) -> Option<u64>;

pub struct Metrics {
    pub volumes: Vec<VolumeMetrics>,
    pub reactors: Vec<ReactorMetrics>,
    /// The node's replication state for `/status`, once a replicated server attached it.
    status: OnceLock<Arc<StatusBoard>>,
}

impl Metrics {
    pub fn new(volume_names: &[&str], reactors: usize) -> Metrics {
        Metrics {
            volumes: volume_names
                .iter()
                .map(|name| VolumeMetrics::new(name))
                .collect(),
            reactors: (0..reactors).map(|_| ReactorMetrics::default()).collect(),
            status: OnceLock::new(),
        }
    }

    /// Serves `board`'s snapshots at `/status` from now on (until then `/status` is 404). The owners
    /// of the volumes publish into the board (`StatusBoard::publish`). A board can be attached once:
    /// a second is refused and handed back.
    pub fn attach_status(&self, board: Arc<StatusBoard>) -> Result<(), Arc<StatusBoard>> {
        self.status.set(board)
    }

    /// The `/status` body, if a board is attached.
    fn render_status(&self) -> Option<String> {
        let board = self.status.get()?;
        Some(
            serde_json::to_string(&board.snapshot()).unwrap_or_else(|error| {
                // A snapshot is plain strings and numbers; this cannot fail, but must not panic either.
                serde_json::json!({ "error": error.to_string() }).to_string()
            }),
        )
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let counters = [
            (
                "ferroblock_requests_total",
                "Requests completed, by kind.",
                0,
            ),
            (
                "ferroblock_bytes_total",
                "Bytes transferred by successful requests, by kind.",
                1,
            ),
            (
                "ferroblock_request_errors_total",
                "Requests that failed, by kind.",
                2,
            ),
        ];
        for (name, help, which) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for volume in &self.volumes {
                for (index, (_, kind)) in KINDS.iter().enumerate() {
                    let value = match which {
                        0 => &volume.requests[index],
                        1 => &volume.bytes[index],
                        _ => &volume.errors[index],
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{volume=\"{}\",kind=\"{kind}\"}} {}",
                        volume.name,
                        value.load(Ordering::Relaxed)
                    );
                }
            }
        }
        let gauges: [Family<VolumeMetrics, i64>; 3] = [
            (
                "ferroblock_requests_in_flight",
                "Requests handed to the volume and not finished.",
                |v| v.in_flight.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_next_op",
                "Next operation number a write will get (persistent volumes).",
                |v| v.next_op.load(Ordering::Relaxed) as i64,
            ),
            (
                "ferroblock_committed_op",
                "Commit watermark: every op up to it is readable.",
                |v| v.committed_op.load(Ordering::Relaxed) as i64,
            ),
        ];
        render_per_volume(&mut out, "gauge", &gauges, &self.volumes);
        let store_counters: [Family<VolumeMetrics, u64>; 8] = [
            (
                "ferroblock_store_syncs_total",
                "Device syncs (fdatasync) a persistent volume issued.",
                |v| v.syncs.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_store_journal_bytes_total",
                "Journal bytes a persistent volume wrote.",
                |v| v.journal_bytes.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_store_data_bytes_total",
                "Note data bytes a persistent volume wrote.",
                |v| v.data_bytes.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_store_notes_total",
                "Notes a persistent volume created (one per write, trim or write-zeroes).",
                |v| v.notes.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_store_inline_notes_total",
                "Notes written inline: data with the journal block in one write.",
                |v| v.inline_notes.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_store_data_writes_total",
                "Device writes of note data (a vectored write of several notes' data counts once).",
                |v| v.data_writes.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_store_home_writes_total",
                "Device writes of inline notes' data to their data-area addresses, done later and in \
                 batches (on a store overwritten at random, about one per inline note).",
                |v| v.home_writes.load(Ordering::Relaxed),
            ),
            (
                "ferroblock_store_checkpoints_total",
                "Checkpoints a persistent volume completed (each bounds the journal replayed at \
                 recovery).",
                |v| v.checkpoints.load(Ordering::Relaxed),
            ),
        ];
        render_per_volume(&mut out, "counter", &store_counters, &self.volumes);
        let name = "ferroblock_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Request latency from decoding to completion, by kind.\n# TYPE {name} histogram"
        );
        for volume in &self.volumes {
            for (kind, histogram) in [
                ("read", &volume.latency_read),
                ("write", &volume.latency_write),
                ("flush", &volume.latency_flush),
            ] {
                histogram.render(
                    &mut out,
                    name,
                    &format!("volume=\"{}\",kind=\"{kind}\"", volume.name),
                );
            }
        }
        let reactor_counters: [Family<ReactorMetrics, f64>; 3] = [
            (
                "ferroblock_reactor_iterations_total",
                "Loop iterations.",
                |r| r.iterations.load(Ordering::Relaxed) as f64,
            ),
            (
                "ferroblock_reactor_busy_seconds_total",
                "Time working or busy polling.",
                |r| r.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
            ),
            (
                "ferroblock_reactor_idle_seconds_total",
                "Time asleep waiting for events.",
                |r| r.idle_ns.load(Ordering::Relaxed) as f64 / 1e9,
            ),
        ];
        for (name, help, value) in reactor_counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (index, reactor) in self.reactors.iter().enumerate() {
                let _ = writeln!(out, "{name}{{reactor=\"{index}\"}} {}", value(reactor));
            }
        }
        self.render_replication(&mut out);
        out
    }

    /// Replication gauges, from the attached status board (replicated nodes only).
    fn render_replication(&self, out: &mut String) {
        let Some(board) = self.status.get() else {
            return;
        };
        let snapshot = board.snapshot();
        let gauges: [(&str, &str, ReplicationGauge); 4] = [
            (
                "ferroblock_replication_epoch",
                "Epoch this peer acts on.",
                |v| Some(v.epoch),
            ),
            (
                "ferroblock_replication_committed_op",
                "This peer's commit watermark.",
                |v| Some(v.committed),
            ),
            (
                "ferroblock_replication_peer_acked_op",
                "On a master: the commit watermark its slave last acknowledged.",
                |v| v.peer_acked,
            ),
            (
                "ferroblock_replication_lag_ops",
                "On a master: ops committed here that the slave has not acknowledged.",
                |v| v.peer_acked.map(|acked| v.committed.saturating_sub(acked)),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for volume in &snapshot.volumes {
                if let Some(value) = value(volume) {
                    let _ = writeln!(
                        out,
                        "{name}{{volume=\"{}\",role=\"{}\"}} {value}",
                        volume.name, volume.role
                    );
                }
            }
        }
    }
}

/// Serves `GET /metrics` (and `GET /status`) on `address` from a thread of its own. Returns the bound
/// address.
pub fn serve(address: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(error) = answer(stream, &metrics) {
                            tracing::debug!(%error, "metrics scrape failed");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "metrics accept failed"),
                }
            }
        })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut chunk)?;
        if read == 0 || request.len() + read > REQUEST_BYTES_MAX {
            break;
        }
        request.extend_from_slice(&chunk[..read]);
    }
    let line = request
        .split(|&byte| byte == b'\n')
        .next()
        .unwrap_or_default();
    let (status, content_type, body) =
        if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                metrics.render(),
            )
        } else if line.starts_with(b"GET /status ") {
            match metrics.render_status() {
                Some(body) => ("200 OK", "application/json", body),
                None => (
                    "404 Not Found",
                    "text/plain",
                    "no replication status: this node serves no replicated volume\n".to_string(),
                ),
            }
        } else if line.starts_with(b"GET ") {
            ("404 Not Found", "text/plain", "try /metrics\n".to_string())
        } else {
            ("400 Bad Request", "text/plain", "bad request\n".to_string())
        };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded() {
        let histogram = LatencyHistogram::default();
        for nanoseconds in [1, 1024, 1025, 2048, 5_000_000_000] {
            histogram.record(nanoseconds);
        }
        let mut out = String::new();
        histogram.render(&mut out, "h", "v=\"x\"");
        assert!(out.contains("h_bucket{v=\"x\",le=\"1.024e-6\"} 2"), "{out}");
        assert!(out.contains("h_bucket{v=\"x\",le=\"2.048e-6\"} 4"), "{out}");
        assert!(out.contains("h_bucket{v=\"x\",le=\"+Inf\"} 5"), "{out}");
        assert!(out.contains("h_count{v=\"x\"} 5"), "{out}");
    }

    #[test]
    fn render_lists_every_family() {
        let metrics = Metrics::new(&["vol0"], 2);
        metrics.volumes[0].started();
        metrics.volumes[0].finished(IoKind::Write, 4096, true, 10_000);
        let text = metrics.render();
        assert!(text.contains("ferroblock_requests_total{volume=\"vol0\",kind=\"write\"} 1"));
        assert!(text.contains("ferroblock_bytes_total{volume=\"vol0\",kind=\"write\"} 4096"));
        assert!(text.contains("ferroblock_requests_in_flight{volume=\"vol0\"} 0"));
        assert!(text.contains("# TYPE ferroblock_store_syncs_total counter"));
        assert!(text.contains("ferroblock_store_syncs_total{volume=\"vol0\"} 0"));
        assert!(text.contains("ferroblock_reactor_iterations_total{reactor=\"1\"} 0"));
    }

    /// `/status` is 404 until a board is attached, then serves what the owner published, and
    /// `ferroblock status`'s fetcher reads it.
    #[test]
    fn status_route_serves_the_attached_board() {
        use crate::cluster::report::{FetchError, fetch_node_status};
        use crate::cluster::status::{PeerState, Role, VolumeStatus};

        let metrics = Arc::new(Metrics::new(&["vol0"], 1));
        let address = serve("127.0.0.1:0".parse().unwrap(), metrics.clone()).unwrap();
        let timeout = Duration::from_secs(10);
        match fetch_node_status(address, timeout) {
            Err(FetchError::Http { status_line, .. }) => {
                assert!(status_line.contains("404"), "{status_line}")
            }
            other => panic!("expected a 404, got {other:?}"),
        }
        let board = Arc::new(StatusBoard::new("n1", &["vol0"]));
        assert!(metrics.attach_status(board.clone()).is_ok());
        assert!(metrics.attach_status(board.clone()).is_err());
        assert_eq!(fetch_node_status(address, timeout).unwrap().volumes, []);
        board.publish(
            0,
            &PeerState {
                role: Role::SoloMaster,
                epoch: 2,
                op: 17,
                committed: 16,
                peer_acked: None,
            },
        );
        let status = fetch_node_status(address, timeout).unwrap();
        assert_eq!(status.node, "n1");
        assert_eq!(
            status.volumes,
            [VolumeStatus {
                name: "vol0".into(),
                role: "solo-master".into(),
                epoch: 2,
                op: 17,
                committed: 16,
                peer_acked: None,
            }]
        );
        // /metrics is unaffected.
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).unwrap();
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(page.contains("ferroblock_requests_total"));
    }
}
