//! The replication hub of one node: drives the `Peer` of every replicated volume the node holds with
//! real sockets, the authority and the local copies, on the reactor that owns those volumes.
//!
//! Owns: the replication listener, every replication socket (connecting, authenticating, open), the
//! clock the peers see, and the translation of each `Action` into a socket write, an authority call or
//! a call on the volume's copy (`ReplicaStore`).
//!
//! Must never: hand a peer a frame that failed its checksum, its handshake or its volume lookup (the
//! socket is closed and the reason logged), block on a socket, or act for a volume on another reactor.
//! The authority is called inline: a file authority answers in about a millisecond (flock, write,
//! fsync, rename), and only on membership changes and start-up.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use crate::cluster::authority::{Authority, CasOutcome};
use crate::cluster::status::{PeerState, Role as StatusRole, StatusBoard};
use crate::replication::auth::{self, Handshake, Progress};
pub use crate::replication::message::CatchUpItem;
use crate::replication::message::NoteMessage;
use crate::replication::peer::{Action, AuthorityReply, Event, LinkId, Peer, Role, Timing};
use crate::replication::wire::{self, FrameDecoder, VolumeId as WireVolumeId};

/// Bytes of catch-up data read per reactor iteration and volume: bounds the iteration's length.
const CATCH_UP_BYTES_PER_ITERATION: usize = 4 << 20;
/// Bytes a socket may have waiting to be sent before the peer's stream is considered stuck.
const SEND_BACKLOG_MAX: usize = 256 << 20;
/// Ticks (timers) at most this often.
const TICK_INTERVAL_US: u64 = 1_000;
const READ_CHUNK: usize = 256 << 10;

/// What replication needs from a volume's local copy. Implemented by `Volume` (persistent copies);
/// the simulator has its own model.
pub trait ReplicaStore {
    fn committed_op(&self) -> u64;
    /// Notes the copy created for host writes since the last call, in op order (master).
    fn take_created_notes(&mut self, out: &mut Vec<NoteMessage>);
    fn set_commit_limit(&mut self, through: u64);
    fn apply_note(&mut self, note: NoteMessage);
    fn discard_uncommitted(&mut self);
    /// Snapshot now; returns the snapshot's commit watermark.
    fn start_catch_up_source(&mut self, id: u64, base: u64) -> u64;
    fn poll_catch_up_source(&mut self, id: u64, out: &mut Vec<CatchUpItem>, budget_bytes: usize);
    fn stop_catch_up_source(&mut self, id: u64);
    /// Whether a source stopped on a read error (it produces nothing more, not even `End`).
    fn catch_up_source_failed(&self, id: u64) -> bool;
    fn apply_catch_up_extent(&mut self, extent: NoteMessage);
    fn finish_catch_up(&mut self, through: u64);
    /// Whether host writes are accepted and until when reads are served (`None`: not at all).
    fn set_serving(&mut self, writes: bool, reads: bool);
    /// Reprovisioning in place: once the copy has nothing in flight with its device, makes it an
    /// empty copy of the same volume and returns its watermark; `Ok(None)`: not idle yet, ask again
    /// on a later pass. An error leaves the store as the old copy or the empty one.
    fn reset_when_idle(&mut self) -> io::Result<Option<u64>>;
}

/// Lends the hub a volume's copy for the length of a call (the reactor owns the volumes).
pub trait StoreAccess {
    fn with(&mut self, volume: u32, f: &mut dyn FnMut(&mut dyn ReplicaStore));
}

/// How the hub reaches the other nodes.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub node: String,
    pub secret: Vec<u8>,
    pub timing: Timing,
    /// Replication address of every node, by id.
    pub addresses: HashMap<String, SocketAddr>,
}

/// One replicated volume on this node.
pub struct ReplicatedVolume {
    /// Index of the volume in the reactor's volume table.
    pub volume: u32,
    pub name: String,
    pub wire_volume: WireVolumeId,
    pub peer: Peer,
    pub authority: Box<dyn Authority>,
    pub status: Option<(std::sync::Arc<StatusBoard>, usize)>,
    /// The NBD export's offered flag: only a master offers the volume.
    pub offered: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// A file that exists while the copy is being caught up (it is not whole until the finish is
    /// durable): it tells a restarted node that it must not act as an in-sync slave.
    pub incomplete_marker: Option<std::path::PathBuf>,
    marker_present: bool,
    /// A `ResetCopy` being carried out (see `ReplicationHub::advance_reset`).
    reset: Option<ResetState>,
    last_committed: u64,
    /// Catch-up sources running, with what they sent: (link, started, extents, bytes).
    sources: Vec<u64>,
    source_progress: HashMap<u64, (Instant, u64, u64)>,
}

impl ReplicatedVolume {
    pub fn new(
        volume: u32,
        name: &str,
        node: &str,
        timing: Timing,
        authority: Box<dyn Authority>,
        status: Option<(std::sync::Arc<StatusBoard>, usize)>,
    ) -> ReplicatedVolume {
        ReplicatedVolume {
            volume,
            name: name.to_string(),
            wire_volume: WireVolumeId::from_name(name),
            peer: Peer::new(node, timing),
            authority,
            status,
            offered: None,
            incomplete_marker: None,
            marker_present: false,
            reset: None,
            last_committed: 0,
            sources: Vec::new(),
            source_progress: HashMap::new(),
        }
    }
}

/// Where a reset of the local copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetState {
    /// Waiting for the incomplete-copy marker to be durable, then for the copy to be idle.
    Pending,
    /// Writing the marker or resetting the store failed (logged): the peer is never answered and
    /// waits, serving nothing, and the marker is never removed; a restart tries again.
    Failed,
}

enum SocketState {
    /// Outbound, TCP connect in progress.
    Connecting {
        handshake: Handshake,
        first: Vec<u8>,
    },
    Authenticating {
        handshake: Handshake,
    },
    /// Authenticated; frames flow. `volume` is known once the first frame (acceptor) or at connect.
    Open {
        decoder: FrameDecoder,
    },
}

struct Socket {
    stream: TcpStream,
    state: SocketState,
    /// The node at the other end (known after the handshake, or at connect).
    node: Option<String>,
    initiated: bool,
    /// Index into `volumes` once bound.
    volume: Option<usize>,
    link: LinkId,
    out: Vec<u8>,
    out_sent: usize,
    closed: bool,
    /// Readable since the last read that would have blocked (edge-triggered readiness).
    ready: bool,
    /// When it was opened: connects and handshakes must finish within the lease timeout.
    opened_us: u64,
}

pub struct ReplicationHub {
    settings: HubSettings,
    listener: Option<TcpListener>,
    token_base: usize,
    sockets: Vec<Option<Socket>>,
    pub volumes: Vec<ReplicatedVolume>,
    started: Instant,
    next_tick_us: u64,
    next_link: LinkId,
    actions: Vec<Action>,
    notes: Vec<NoteMessage>,
    items: Vec<CatchUpItem>,
    read_buf: Vec<u8>,
    /// Sockets opened by actions, registered at the start of the next `run`.
    pending_sockets: Vec<Socket>,
}

impl ReplicationHub {
    pub fn new(
        settings: HubSettings,
        listener: TcpListener,
        volumes: Vec<ReplicatedVolume>,
        token_base: usize,
    ) -> ReplicationHub {
        ReplicationHub {
            settings,
            listener: Some(listener),
            token_base,
            sockets: Vec::new(),
            volumes,
            started: Instant::now(),
            next_tick_us: 0,
            next_link: 1,
            actions: Vec::new(),
            notes: Vec::new(),
            items: Vec::new(),
            read_buf: vec![0; READ_CHUNK],
            pending_sockets: Vec::new(),
        }
    }

    pub fn listener_token(&self) -> Token {
        Token(self.token_base)
    }

    pub fn owns_token(&self, token: Token) -> bool {
        token.0 >= self.token_base
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        let token = self.listener_token();
        if let Some(listener) = self.listener.as_mut() {
            registry.register(listener, token, Interest::READABLE)?;
        }
        Ok(())
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Microseconds until the next timer, for the reactor's sleep.
    pub fn next_deadline_us(&self) -> u64 {
        self.next_tick_us.saturating_sub(self.now_us())
    }

    /// Starts every volume's peer: the copies have recovered.
    pub fn start(&mut self, stores: &mut dyn StoreAccess) {
        let now = self.now_us();
        for index in 0..self.volumes.len() {
            let mut committed = 0;
            stores.with(self.volumes[index].volume, &mut |store| {
                committed = store.committed_op();
            });
            let incomplete = self.volumes[index]
                .incomplete_marker
                .as_ref()
                .is_some_and(|marker| marker.exists());
            self.volumes[index].marker_present = incomplete;
            self.volumes[index].last_committed = committed;
            self.feed(
                index,
                now,
                Event::Start {
                    committed,
                    incomplete,
                },
                stores,
            );
        }
    }

    /// A socket event.
    pub fn on_event(&mut self, registry: &Registry, token: Token) {
        if token == self.listener_token() {
            self.accept(registry);
            return;
        }
        // Served in `run`: readiness is edge-triggered, so `run` reads until WouldBlock.
        self.mark_ready(token);
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, address)) => {
                    let _ = stream.set_nodelay(true);
                    let nonce = match auth::fresh_nonce() {
                        Ok(nonce) => nonce,
                        Err(error) => {
                            tracing::error!(%error, "no randomness for a handshake: refusing {address}");
                            continue;
                        }
                    };
                    let handshake =
                        Handshake::acceptor(&self.settings.secret, &self.settings.node, nonce);
                    let link = self.next_link;
                    self.next_link += 1;
                    self.add_socket(
                        registry,
                        Socket {
                            stream,
                            state: SocketState::Authenticating { handshake },
                            node: None,
                            initiated: false,
                            volume: None,
                            link,
                            out: Vec::new(),
                            out_sent: 0,
                            closed: false,
                            ready: true,
                            opened_us: 0,
                        },
                    );
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    tracing::warn!(%error, "replication accept failed");
                    return;
                }
            }
        }
    }

    fn add_socket(&mut self, registry: &Registry, mut socket: Socket) -> Option<usize> {
        socket.opened_us = self.now_us();
        let slot = self
            .sockets
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.sockets.push(None);
                self.sockets.len() - 1
            });
        let token = Token(self.token_base + 1 + slot);
        if let Err(error) = registry.register(
            &mut socket.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%error, "cannot register a replication socket");
            return None;
        }
        self.sockets[slot] = Some(socket);
        Some(slot)
    }

    /// One pass: sockets, new notes, commit progress, catch-up sources, timers; `stores` lends each
    /// volume's copy.
    pub fn run(&mut self, registry: &Registry, stores: &mut dyn StoreAccess) {
        let now = self.now_us();
        for socket in std::mem::take(&mut self.pending_sockets) {
            let link = socket.link;
            let node = socket.node.clone().unwrap_or_default();
            let index = socket.volume;
            if self.add_socket(registry, socket).is_none()
                && let Some(index) = index
            {
                let _ = link;
                self.feed(index, now, Event::ConnectFailed { node }, stores);
            }
        }
        // Sockets: connect completion, handshake, frames.
        for slot in 0..self.sockets.len() {
            self.serve_socket(slot, now, stores);
        }
        for index in 0..self.volumes.len() {
            let volume = self.volumes[index].volume;
            // Notes the copy created this iteration (master), and its commit progress.
            let mut notes = std::mem::take(&mut self.notes);
            let mut committed = 0;
            stores.with(volume, &mut |store| {
                store.take_created_notes(&mut notes);
                committed = store.committed_op();
            });
            for note in notes.drain(..) {
                self.feed(index, now, Event::NoteCreated(note), stores);
            }
            self.notes = notes;
            if committed != self.volumes[index].last_committed {
                self.volumes[index].last_committed = committed;
                self.feed(index, now, Event::Committed { through: committed }, stores);
            }
            for source in self.volumes[index].sources.clone() {
                let mut items = std::mem::take(&mut self.items);
                let mut failed = false;
                stores.with(volume, &mut |store| {
                    store.poll_catch_up_source(source, &mut items, CATCH_UP_BYTES_PER_ITERATION);
                    failed = store.catch_up_source_failed(source);
                });
                if failed {
                    // The peer is told by the link's end; a new link starts a new catch-up.
                    self.volumes[index].sources.retain(|&id| id != source);
                    self.volumes[index].source_progress.remove(&source);
                    if let Some(slot) = self.slot_of_link(source) {
                        self.close(slot, now, "catch-up source read failed", stores);
                    }
                }
                for item in items.drain(..) {
                    let event = match item {
                        CatchUpItem::Extent(extent) => {
                            if let Some(progress) =
                                self.volumes[index].source_progress.get_mut(&source)
                            {
                                progress.1 += 1;
                                progress.2 += extent.length;
                            }
                            Event::CatchUpExtent {
                                link: source,
                                extent,
                            }
                        }
                        CatchUpItem::End => {
                            self.volumes[index].sources.retain(|&id| id != source);
                            if let Some((started, extents, bytes)) =
                                self.volumes[index].source_progress.remove(&source)
                            {
                                let seconds = started.elapsed().as_secs_f64();
                                tracing::info!(
                                    volume = %self.volumes[index].name,
                                    extents,
                                    bytes,
                                    seconds,
                                    mb_per_s = bytes as f64 / 1e6 / seconds.max(1e-9),
                                    "catch-up sent"
                                );
                            }
                            Event::CatchUpEnd { link: source }
                        }
                    };
                    self.feed(index, now, event, stores);
                }
                self.items = items;
            }
            if self.volumes[index].reset == Some(ResetState::Pending) {
                self.advance_reset(index, now, stores);
            }
            if now >= self.next_tick_us {
                self.feed(index, now, Event::Tick, stores);
            }
            // A reset not answered yet keeps the marker whatever the peer says: the copy is about to
            // be (or may already be) empty.
            if self.volumes[index].marker_present
                && self.volumes[index].reset.is_none()
                && !self.volumes[index].peer.status().incomplete
            {
                let volume = &mut self.volumes[index];
                if let Some(marker) = &volume.incomplete_marker
                    && let Err(error) = remove_marker(marker)
                {
                    tracing::error!(%error, path = %marker.display(), "cannot remove the incomplete-copy marker");
                }
                volume.marker_present = false;
            }
            let peer = &self.volumes[index].peer;
            let (exports, reads) = (peer.exports(), peer.serves_reads(now));
            stores.with(volume, &mut |store| store.set_serving(exports, reads));
            if let Some(offered) = &self.volumes[index].offered {
                offered.store(exports, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some((board, cell)) = &self.volumes[index].status {
                let status = peer.status();
                board.publish(
                    *cell,
                    &PeerState {
                        role: status_role(status.role),
                        epoch: status.epoch,
                        op: committed,
                        committed,
                        peer_acked: status.peer_acked,
                    },
                );
            }
        }
        if now >= self.next_tick_us {
            self.next_tick_us = now + TICK_INTERVAL_US;
        }
        // Connects requested by the peers.
        for slot in 0..self.sockets.len() {
            self.flush(slot);
        }
        self.reap_closed(registry);
    }

    fn serve_socket(&mut self, slot: usize, now: u64, stores: &mut dyn StoreAccess) {
        let Some(socket) = self.sockets[slot].as_mut() else {
            return;
        };
        if socket.closed {
            return;
        }
        let unfinished = !matches!(socket.state, SocketState::Open { .. });
        if unfinished
            && now.saturating_sub(socket.opened_us) > self.settings.timing.lease_timeout_us
        {
            if socket.initiated && matches!(socket.state, SocketState::Connecting { .. }) {
                self.fail_connect(slot, now, stores);
            } else {
                self.close(slot, now, "connect or handshake timed out", stores);
            }
            return;
        }
        if let SocketState::Connecting { .. } = socket.state {
            match socket.stream.peer_addr() {
                Ok(_) => {
                    let SocketState::Connecting { handshake, first } = std::mem::replace(
                        &mut socket.state,
                        SocketState::Open {
                            decoder: FrameDecoder::new(),
                        },
                    ) else {
                        unreachable!()
                    };
                    socket.out.extend_from_slice(&first);
                    socket.state = SocketState::Authenticating { handshake };
                }
                Err(error) if error.kind() == io::ErrorKind::NotConnected => {
                    if let Ok(Some(error)) | Err(error) = socket.stream.take_error() {
                        tracing::info!(%error, "replication connect failed");
                        self.fail_connect(slot, now, stores);
                    }
                    return;
                }
                Err(error) => {
                    tracing::info!(%error, "replication connect failed");
                    self.fail_connect(slot, now, stores);
                    return;
                }
            }
        }
        if !self.sockets[slot]
            .as_ref()
            .is_some_and(|socket| socket.ready)
        {
            return;
        }
        // Read what is there.
        loop {
            let socket = self.sockets[slot].as_mut().expect("live socket");
            if socket.closed {
                return;
            }
            debug_assert!(!self.read_buf.is_empty(), "read buffer lent out");
            let read = socket.stream.read(&mut self.read_buf);
            match read {
                Ok(0) => {
                    self.close(slot, now, "closed by the peer", stores);
                    return;
                }
                Ok(length) => {
                    // Lent out for the call (`on_bytes` needs the hub): no copy of what was read.
                    let buffer = std::mem::take(&mut self.read_buf);
                    let open = self.on_bytes(slot, now, &buffer[..length], stores);
                    self.read_buf = buffer;
                    if !open {
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    socket.ready = false;
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.close(slot, now, &format!("read failed: {error}"), stores);
                    return;
                }
            }
        }
    }

    fn fail_connect(&mut self, slot: usize, now: u64, stores: &mut dyn StoreAccess) {
        let socket = self.sockets[slot].as_mut().expect("live socket");
        socket.closed = true;
        let node = socket.node.clone().unwrap_or_default();
        if let Some(index) = socket.volume {
            self.feed(index, now, Event::ConnectFailed { node }, stores);
        }
    }

    /// Bytes from a socket; false once it is closed.
    fn on_bytes(
        &mut self,
        slot: usize,
        now: u64,
        bytes: &[u8],
        stores: &mut dyn StoreAccess,
    ) -> bool {
        let socket = self.sockets[slot].as_mut().expect("live socket");
        let mut leftover = Vec::new();
        if let SocketState::Authenticating { handshake } = &mut socket.state {
            match handshake.on_bytes(bytes) {
                Ok(Progress::Continue { send }) => {
                    socket.out.extend_from_slice(&send);
                    return true;
                }
                Ok(Progress::Authenticated {
                    send,
                    peer_node,
                    leftover_bytes,
                }) => {
                    socket.out.extend_from_slice(&send);
                    if socket.initiated && socket.node.as_deref() != Some(peer_node.as_str()) {
                        let reason =
                            format!("authenticated as {peer_node}, expected {:?}", socket.node);
                        self.close(slot, now, &reason, stores);
                        return false;
                    }
                    socket.node = Some(peer_node.clone());
                    socket.state = SocketState::Open {
                        decoder: FrameDecoder::new(),
                    };
                    leftover = leftover_bytes;
                    if socket.initiated
                        && let Some(index) = socket.volume
                    {
                        let link = socket.link;
                        self.feed(
                            index,
                            now,
                            Event::LinkUp {
                                link,
                                node: peer_node,
                                initiated: true,
                            },
                            stores,
                        );
                    }
                }
                Err(error) => {
                    self.close(slot, now, &format!("handshake refused: {error}"), stores);
                    return false;
                }
            }
        } else {
            leftover.extend_from_slice(bytes);
        }
        if leftover.is_empty() {
            return true;
        }
        let socket = self.sockets[slot].as_mut().expect("live socket");
        let SocketState::Open { decoder } = &mut socket.state else {
            return true;
        };
        decoder.push(&leftover);
        loop {
            let socket = self.sockets[slot].as_mut().expect("live socket");
            let SocketState::Open { decoder } = &mut socket.state else {
                return true;
            };
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return true,
                Err(error) => {
                    self.close(slot, now, &format!("malformed frame: {error}"), stores);
                    return false;
                }
            };
            let index = match socket.volume {
                Some(index) => {
                    if self.volumes[index].wire_volume != frame.volume {
                        self.close(slot, now, "frame for another volume", stores);
                        return false;
                    }
                    index
                }
                None => {
                    // The acceptor learns the volume from the first frame.
                    let Some(index) = self
                        .volumes
                        .iter()
                        .position(|volume| volume.wire_volume == frame.volume)
                    else {
                        self.close(
                            slot,
                            now,
                            "frame for a volume this node does not hold",
                            stores,
                        );
                        return false;
                    };
                    socket.volume = Some(index);
                    let link = socket.link;
                    let node = socket.node.clone().unwrap_or_default();
                    self.feed(
                        index,
                        now,
                        Event::LinkUp {
                            link,
                            node,
                            initiated: false,
                        },
                        stores,
                    );
                    index
                }
            };
            let link = self.sockets[slot].as_ref().expect("live socket").link;
            self.feed(
                index,
                now,
                Event::Received {
                    link,
                    epoch: frame.epoch,
                    message: frame.message,
                },
                stores,
            );
            if self.sockets[slot]
                .as_ref()
                .is_none_or(|socket| socket.closed)
            {
                return false;
            }
        }
    }

    fn slot_of_link(&self, link: LinkId) -> Option<usize> {
        self.sockets
            .iter()
            .position(|socket| socket.as_ref().is_some_and(|s| s.link == link && !s.closed))
    }

    fn close(&mut self, slot: usize, now: u64, reason: &str, stores: &mut dyn StoreAccess) {
        let Some(socket) = self.sockets[slot].as_mut() else {
            return;
        };
        if socket.closed {
            return;
        }
        socket.closed = true;
        tracing::info!(peer = ?socket.node, link = socket.link, %reason, "replication link closed");
        let link = socket.link;
        let opened = matches!(socket.state, SocketState::Open { .. });
        // An outbound link that never got through its handshake is a failed connect: the peer is
        // still waiting for its answer (and would otherwise never try again).
        let failed_connect = socket.initiated && !opened;
        let node = socket.node.clone().unwrap_or_default();
        if let Some(index) = socket.volume {
            let event = if failed_connect {
                Event::ConnectFailed { node }
            } else {
                Event::LinkDown { link }
            };
            self.feed(index, now, event, stores);
        }
    }

    fn reap_closed(&mut self, registry: &Registry) {
        for slot in 0..self.sockets.len() {
            if self.sockets[slot]
                .as_ref()
                .is_some_and(|socket| socket.closed)
            {
                let mut socket = self.sockets[slot].take().expect("live socket");
                let _ = registry.deregister(&mut socket.stream);
            }
        }
    }

    fn flush(&mut self, slot: usize) {
        let Some(socket) = self.sockets[slot].as_mut() else {
            return;
        };
        if socket.closed || matches!(socket.state, SocketState::Connecting { .. }) {
            return;
        }
        while socket.out_sent < socket.out.len() {
            match socket.stream.write(&socket.out[socket.out_sent..]) {
                Ok(0) => break,
                Ok(written) => socket.out_sent += written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::info!(%error, link = socket.link, "replication write failed");
                    // The read side reports the close to the peer on the next pass.
                    let _ = socket.stream.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
        }
        if socket.out_sent == socket.out.len() {
            socket.out.clear();
            socket.out_sent = 0;
        } else if socket.out_sent > (1 << 20) {
            socket.out.drain(..socket.out_sent);
            socket.out_sent = 0;
        }
        if socket.out.len() > SEND_BACKLOG_MAX {
            tracing::warn!(
                link = socket.link,
                "replication send backlog too large: closing"
            );
            let _ = socket.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Feeds one event to a volume's peer and carries out its actions (and their immediate answers).
    fn feed(&mut self, index: usize, now: u64, event: Event, stores: &mut dyn StoreAccess) {
        let mut events = std::collections::VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            let mut actions = std::mem::take(&mut self.actions);
            self.volumes[index].peer.handle(now, event, &mut actions);
            for action in actions.drain(..) {
                self.act(index, now, action, stores, &mut events);
            }
            self.actions = actions;
        }
    }

    fn act(
        &mut self,
        index: usize,
        now: u64,
        action: Action,
        stores: &mut dyn StoreAccess,
        events: &mut std::collections::VecDeque<Event>,
    ) {
        let _ = now;
        let volume_index = self.volumes[index].volume;
        match action {
            Action::Send {
                link,
                epoch,
                message,
            } => {
                let Some(slot) = self.slot_of_link(link) else {
                    return;
                };
                if let Err(error) = wire::validate(&message) {
                    tracing::error!(%error, "refusing to send an invalid replication message");
                    return;
                }
                let volume = self.volumes[index].wire_volume;
                let socket = self.sockets[slot].as_mut().expect("live socket");
                wire::encode(volume, epoch, &message, &mut socket.out);
                if socket.out.len() - socket.out_sent > 64 << 10 {
                    self.flush(slot);
                }
            }
            Action::Connect { node } => {
                let Some(&address) = self.settings.addresses.get(&node) else {
                    tracing::error!(%node, "no replication address for this node");
                    events.push_back(Event::ConnectFailed { node });
                    return;
                };
                let nonce = match auth::fresh_nonce() {
                    Ok(nonce) => nonce,
                    Err(error) => {
                        tracing::error!(%error, "no randomness for a handshake");
                        events.push_back(Event::ConnectFailed { node });
                        return;
                    }
                };
                let stream = match TcpStream::connect(address) {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::info!(%node, %error, "replication connect failed");
                        events.push_back(Event::ConnectFailed { node });
                        return;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (handshake, first) =
                    Handshake::initiator(&self.settings.secret, &self.settings.node, nonce);
                let link = self.next_link;
                self.next_link += 1;
                let socket = Socket {
                    stream,
                    state: SocketState::Connecting { handshake, first },
                    node: Some(node.clone()),
                    initiated: true,
                    volume: Some(index),
                    link,
                    out: Vec::new(),
                    out_sent: 0,
                    closed: false,
                    ready: true,
                    opened_us: 0,
                };
                if self.add_socket_pending(socket).is_none() {
                    events.push_back(Event::ConnectFailed { node });
                }
            }
            Action::Close { link } => {
                if let Some(slot) = self.slot_of_link(link) {
                    self.flush(slot);
                    let socket = self.sockets[slot].as_mut().expect("live socket");
                    socket.closed = true;
                    let _ = socket.stream.shutdown(std::net::Shutdown::Both);
                }
            }
            Action::ReadAuthority => {
                let volume = &self.volumes[index];
                let reply = match volume.authority.read(&volume.name) {
                    Ok(current) => AuthorityReply::Current(current),
                    Err(error) => {
                        tracing::warn!(%error, "authority read failed");
                        AuthorityReply::Unavailable
                    }
                };
                events.push_back(Event::Authority(reply));
            }
            Action::CompareAndSwap {
                expected_epoch,
                proposed,
            } => {
                let volume = &self.volumes[index];
                let reply =
                    match volume
                        .authority
                        .compare_and_swap(&volume.name, expected_epoch, &proposed)
                    {
                        Ok(CasOutcome::Swapped) => {
                            tracing::info!(volume = %volume.name, ?proposed, "membership changed");
                            AuthorityReply::Swapped(proposed)
                        }
                        Ok(CasOutcome::Conflict(current)) => AuthorityReply::Conflict(current),
                        Err(error) => {
                            tracing::warn!(%error, "authority compare-and-swap failed");
                            AuthorityReply::Unavailable
                        }
                    };
                events.push_back(Event::Authority(reply));
            }
            Action::SetCommitLimit { through } => {
                stores.with(volume_index, &mut |store| store.set_commit_limit(through));
            }
            Action::ApplyNote(note) => {
                let mut note = Some(note);
                stores.with(volume_index, &mut |store| {
                    if let Some(note) = note.take() {
                        store.apply_note(note);
                    }
                });
            }
            Action::DiscardUncommitted => {
                stores.with(volume_index, &mut |store| store.discard_uncommitted());
            }
            Action::ResetCopy => {
                // Reprovisioning in place, carried out over the next passes (`advance_reset`): the
                // marker first, then, once the copy is idle, the reset; answered by `CopyReset`.
                let volume = &mut self.volumes[index];
                if volume.reset.is_none() {
                    tracing::warn!(volume = %volume.name,
                        "this copy holds ops of a history the master dropped: resetting it in place");
                    volume.reset = Some(ResetState::Pending);
                }
            }
            Action::StartCatchUpSource { link, base } => {
                let mut through = 0;
                stores.with(volume_index, &mut |store| {
                    through = store.start_catch_up_source(link, base);
                });
                self.volumes[index].sources.push(link);
                self.volumes[index]
                    .source_progress
                    .insert(link, (Instant::now(), 0, 0));
                events.push_front(Event::CatchUpSnapshot { link, through });
            }
            Action::StopCatchUpSource { link } => {
                stores.with(volume_index, &mut |store| store.stop_catch_up_source(link));
                self.volumes[index].sources.retain(|&id| id != link);
                self.volumes[index].source_progress.remove(&link);
            }
            Action::ApplyCatchUpExtent(extent) => {
                let volume = &mut self.volumes[index];
                if !volume.marker_present
                    && let Some(marker) = &volume.incomplete_marker
                {
                    // Durable before the first item is: a crash from here on leaves it behind.
                    if let Err(error) = write_marker(marker) {
                        tracing::error!(%error, path = %marker.display(), "cannot record an incomplete copy");
                    }
                    volume.marker_present = true;
                }
                let mut extent = Some(extent);
                stores.with(volume_index, &mut |store| {
                    if let Some(extent) = extent.take() {
                        store.apply_catch_up_extent(extent);
                    }
                });
            }
            Action::FinishCatchUp { through } => {
                stores.with(volume_index, &mut |store| store.finish_catch_up(through));
            }
        }
    }

    /// One step of a pending reset: the incomplete-copy marker, durable before anything else (a crash
    /// from there on restarts the node as a copy to be caught up, whether the store is still the old
    /// copy or already the empty one); then, once the copy has no device IO in flight (polled on each
    /// pass, never waited for), the reset of the store; then `CopyReset` to the peer.
    fn advance_reset(&mut self, index: usize, now: u64, stores: &mut dyn StoreAccess) {
        let volume = &mut self.volumes[index];
        if !volume.marker_present
            && let Some(marker) = &volume.incomplete_marker
        {
            if let Err(error) = write_marker(marker) {
                tracing::error!(%error, path = %marker.display(),
                    "cannot record an incomplete copy: not resetting it (restart the node to retry)");
                volume.reset = Some(ResetState::Failed);
                return;
            }
            volume.marker_present = true;
        }
        let mut outcome = Ok(None);
        stores.with(volume.volume, &mut |store| {
            outcome = store.reset_when_idle();
        });
        match outcome {
            Ok(None) => {}
            Ok(Some(committed)) => {
                let volume = &mut self.volumes[index];
                tracing::warn!(volume = %volume.name, committed,
                    "copy reset in place: catching up whole from the master");
                debug_assert!(
                    volume.sources.is_empty(),
                    "a copy being reset serves no catch-up"
                );
                volume.reset = None;
                volume.last_committed = committed;
                self.feed(index, now, Event::CopyReset { committed }, stores);
            }
            Err(error) => {
                let volume = &mut self.volumes[index];
                tracing::error!(volume = %volume.name, %error,
                    "cannot reset the copy: it stays marked incomplete (restart the node to retry)");
                volume.reset = Some(ResetState::Failed);
            }
        }
    }

    /// Sockets created by an action are registered on the next `run` (the registry is not at hand).
    fn add_socket_pending(&mut self, socket: Socket) -> Option<usize> {
        self.pending_sockets.push(socket);
        Some(0)
    }

    /// Marks a socket readable (its token fired).
    fn mark_ready(&mut self, token: Token) {
        if let Some(Some(socket)) = token
            .0
            .checked_sub(self.token_base + 1)
            .and_then(|slot| self.sockets.get_mut(slot))
        {
            socket.ready = true;
        }
    }
}

fn status_role(role: Role) -> StatusRole {
    match role {
        Role::Master => StatusRole::Master,
        Role::SoloMaster => StatusRole::SoloMaster,
        Role::Slave => StatusRole::Slave,
        Role::CatchingUp => StatusRole::CatchingUp,
        Role::Starting | Role::Fenced => StatusRole::Fenced,
    }
}

/// Creates `marker` durably (file and directory entry).
fn write_marker(marker: &std::path::Path) -> io::Result<()> {
    let file = std::fs::File::create(marker)?;
    file.sync_all()?;
    sync_parent(marker)
}

fn remove_marker(marker: &std::path::Path) -> io::Result<()> {
    match std::fs::remove_file(marker) {
        Ok(()) => sync_parent(marker),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

fn sync_parent(path: &std::path::Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}
