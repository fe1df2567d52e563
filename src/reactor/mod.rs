//! Reactors: one pinned thread per core, each a run-to-completion loop.
//!
//! Owns: per reactor, its `mio` poller and sockets, its io_uring, the volumes placed on it, its client
//! connections, its timers, and the routing of requests and completions between reactors (through
//! `mailbox`). One loop iteration: wait for or poll events, serve ready sockets, reap io_uring
//! completions, drain inbound rings, deliver completions, write replies, run timers, submit to the kernel.
//! Must never: block outside the poller, take a lock, or let another thread touch what it owns; a volume
//! is reached from another reactor only by a message in its owner's ring.

pub mod mailbox;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::frontend::nbd::{CloseReason, Connection, ExportInfo};
use crate::io::uring::Uring;
use crate::metrics::Metrics;
use crate::replication::hub::{ReplicaStore, ReplicationHub, StoreAccess};
use crate::volume::replica::VolumeReplica;
use crate::volume::{IoCompletion, IoRequest, Origin, SubmitIo, Volume, VolumeId};
pub use mailbox::{Mailbox, Message};

/// How a reactor waits when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    /// Never sleep: lowest latency, one full core per reactor.
    Busy,
    /// Spin for a while after the last work, then sleep until an event.
    Adaptive,
    /// Always sleep until an event.
    Interrupt,
}

const WAKER_TOKEN: Token = Token(0);
const LISTENER_TOKEN: Token = Token(1);
const URING_TOKEN: Token = Token(2);
const FIRST_CONNECTION_TOKEN: usize = 3;

/// Clients one reactor serves at most; more are accepted and closed with a log line.
pub const CONNECTIONS_PER_REACTOR_MAX: usize = 4096;
/// A client must finish negotiating within this time.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Events taken from the poller per iteration.
const EVENTS_PER_POLL: usize = 256;
/// Loop iterations between publications of the loop metrics.
const LOOP_METRICS_BATCH: u64 = 4096;
/// Messages taken from each inbound ring per iteration, so that one busy peer cannot starve sockets.
const MESSAGES_PER_RING_PER_ITERATION: usize = 256;

/// Shared by all reactors: the shutdown request and how many reactors have no clients left.
pub struct Shutdown {
    requested: AtomicBool,
    drained_reactors: AtomicUsize,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            requested: AtomicBool::new(false),
            drained_reactors: AtomicUsize::new(0),
        }
    }

    /// Asks every reactor to finish: called from the signal thread.
    pub fn request(&self, mailboxes: &[Mailbox]) {
        self.requested.store(true, Ordering::SeqCst);
        for mailbox in mailboxes {
            mailbox.wake();
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }
}

/// What a reactor thread is given at start.
pub struct ReactorSetup {
    pub id: usize,
    pub core: Option<core_affinity::CoreId>,
    pub poll_mode: PollMode,
    pub spin: Duration,
    pub poll: Poll,
    pub listener: Option<TcpListener>,
    /// Volumes this reactor owns, as (id, volume).
    pub volumes: Vec<Volume>,
    /// For every volume id, the reactor that owns it.
    pub owners: Arc<[u16]>,
    pub exports: Arc<[ExportInfo]>,
    pub mailboxes: Arc<[Mailbox]>,
    pub shutdown: Arc<Shutdown>,
    pub metrics: Arc<Metrics>,
    /// Cores for the kernel's io-wq workers of this reactor's ring (see `Uring::set_worker_cpus`).
    pub worker_cpus: Vec<usize>,
    /// The replication of the volumes this reactor owns (cluster nodes only).
    pub replication: Option<ReplicationHub>,
}

/// First token of the replication hub's sockets (below it: the waker, listener, ring, connections).
pub const REPLICATION_TOKEN_BASE: usize = 1 << 30;

/// Routes requests to their volume's owner and completions back to their connection's reactor.
struct IoRouter {
    id: usize,
    volumes: Vec<Option<Volume>>,
    owners: Arc<[u16]>,
    uring: Uring,
    /// Completions for this reactor's connections, ready to deliver.
    done: VecDeque<IoCompletion>,
    mailboxes: Arc<[Mailbox]>,
    /// Messages whose ring was full, per target reactor, in order.
    parked: Vec<VecDeque<Message>>,
    wake_pending: Vec<bool>,
    /// Requests this reactor's connections submitted and have not had back: the host's queue depth
    /// here, which the adaptive spin policy reads (a hint: nothing relies on it being exact).
    requests_in_flight: usize,
}

impl IoRouter {
    fn execute_local(&mut self, request: IoRequest) {
        let volume = self.volumes[request.volume as usize]
            .as_mut()
            .expect("request routed to the volume's owner");
        volume.submit(request, &mut self.uring, &mut self.done);
    }

    fn post(&mut self, target: usize, message: Message) {
        self.wake_pending[target] = true;
        if !self.parked[target].is_empty() {
            self.parked[target].push_back(message);
            return;
        }
        if let Err(message) = self.mailboxes[target].post(self.id, message) {
            self.parked[target].push_back(message);
        }
    }

    /// Retries parked messages and wakes the reactors that got something.
    fn flush_outbound(&mut self) {
        for target in 0..self.parked.len() {
            while let Some(message) = self.parked[target].pop_front() {
                if let Err(message) = self.mailboxes[target].post(self.id, message) {
                    self.parked[target].push_front(message);
                    break;
                }
            }
            if std::mem::take(&mut self.wake_pending[target]) {
                self.mailboxes[target].wake_if_sleeping();
            }
        }
    }

    fn volume_io_in_flight(&self) -> usize {
        self.volumes.iter().flatten().map(Volume::in_flight).sum()
    }

    fn has_outbound(&self) -> bool {
        self.parked.iter().any(|queue| !queue.is_empty())
    }
}

impl SubmitIo for IoRouter {
    fn submit(&mut self, request: IoRequest) {
        self.requests_in_flight += 1;
        let owner = usize::from(self.owners[request.volume as usize]);
        if owner == self.id {
            let before = self.done.len();
            self.execute_local(request);
            // Completions of other reactors' requests go home; ours stay in `done`.
            self.send_foreign_completions(before);
        } else {
            self.post(owner, Message::Io(request));
        }
    }
}

impl IoRouter {
    /// Completions appended to `done` since `from` that belong to other reactors are posted home.
    fn send_foreign_completions(&mut self, from: usize) {
        let mut index = from;
        while index < self.done.len() {
            if usize::from(self.done[index].origin.reactor) != self.id {
                let completion = self.done.remove(index).expect("index in range");
                let home = usize::from(completion.origin.reactor);
                self.post(home, Message::Done(completion));
            } else {
                index += 1;
            }
        }
    }
}

/// This reactor's client connections, indexed by token, with generations so that a late completion for
/// a closed connection is recognised and dropped.
struct ConnectionTable {
    entries: Vec<Option<Connection>>,
    generations: Vec<u32>,
    dirty: Vec<bool>,
    free: Vec<u32>,
    live: usize,
}

impl ConnectionTable {
    fn new() -> ConnectionTable {
        ConnectionTable {
            entries: Vec::new(),
            generations: Vec::new(),
            dirty: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }

    fn reserve(&mut self) -> Option<(u32, u32)> {
        if self.live >= CONNECTIONS_PER_REACTOR_MAX {
            return None;
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.entries.push(None);
                self.generations.push(0);
                self.dirty.push(false);
                (self.entries.len() - 1) as u32
            }
        };
        self.generations[index as usize] = self.generations[index as usize].wrapping_add(1);
        Some((index, self.generations[index as usize]))
    }

    fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut Connection> {
        if self.generations.get(index as usize) != Some(&generation) {
            return None;
        }
        self.entries[index as usize].as_mut()
    }
}

pub struct Reactor {
    id: usize,
    core: Option<core_affinity::CoreId>,
    poll_mode: PollMode,
    spin: Duration,
    poll: Poll,
    listener: Option<TcpListener>,
    next_accept_target: usize,
    connections: ConnectionTable,
    dirty: Vec<u32>,
    /// The dirty list being worked through (swapped with `dirty` so that neither allocates).
    dirty_spare: Vec<u32>,
    exports: Arc<[ExportInfo]>,
    router: IoRouter,
    completions: Vec<(u64, i32)>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    shutdown: Arc<Shutdown>,
    draining: bool,
    counted_drained: bool,
    metrics: Arc<Metrics>,
    worker_cpus: Vec<usize>,
    /// Whether io-wq workers may run on this reactor's core (it is among `worker_cpus`, or the
    /// reactor is not pinned).
    workers_share_core: bool,
    replication: Option<ReplicationHub>,
    /// Loop accounting gathered locally and published now and then (atomics are not free).
    pending_iterations: u64,
    pending_busy_ns: u64,
    pending_idle_ns: u64,
    /// When the current iteration's poll returned: the clock of everything the iteration does.
    now: Instant,
}

impl Reactor {
    pub fn new(setup: ReactorSetup) -> io::Result<Reactor> {
        let uring = Uring::new()?;
        let registry = setup.poll.registry();
        registry.register(
            &mut SourceFd(&uring.eventfd()),
            URING_TOKEN,
            Interest::READABLE,
        )?;
        let mut listener = setup.listener;
        if let Some(listener) = listener.as_mut() {
            registry.register(listener, LISTENER_TOKEN, Interest::READABLE)?;
        }
        let mut replication = setup.replication;
        if let Some(hub) = replication.as_mut() {
            hub.register(registry)?;
        }
        let reactors = setup.mailboxes.len();
        let mut volumes: Vec<Option<Volume>> = (0..setup.owners.len()).map(|_| None).collect();
        for volume in setup.volumes {
            debug_assert_eq!(usize::from(setup.owners[volume.id as usize]), setup.id);
            let id = volume.id as usize;
            volumes[id] = Some(volume);
        }
        Ok(Reactor {
            id: setup.id,
            core: setup.core,
            poll_mode: setup.poll_mode,
            spin: setup.spin,
            poll: setup.poll,
            listener,
            next_accept_target: setup.id,
            connections: ConnectionTable::new(),
            dirty: Vec::with_capacity(64),
            dirty_spare: Vec::with_capacity(64),
            exports: setup.exports,
            router: IoRouter {
                id: setup.id,
                volumes,
                owners: setup.owners,
                uring,
                done: VecDeque::with_capacity(1024),
                mailboxes: setup.mailboxes,
                parked: (0..reactors).map(|_| VecDeque::new()).collect(),
                wake_pending: vec![false; reactors],
                requests_in_flight: 0,
            },
            completions: Vec::with_capacity(1024),
            timers: BinaryHeap::new(),
            shutdown: setup.shutdown,
            draining: false,
            counted_drained: false,
            metrics: setup.metrics,
            workers_share_core: setup
                .core
                .is_none_or(|core| setup.worker_cpus.contains(&core.id)),
            worker_cpus: setup.worker_cpus,
            replication,
            pending_iterations: 0,
            pending_busy_ns: 0,
            pending_idle_ns: 0,
            now: Instant::now(),
        })
    }

    /// Runs the loop until shutdown has drained every reactor.
    pub fn run(mut self) -> io::Result<()> {
        if let Some(core) = self.core
            && !core_affinity::set_for_current(core)
        {
            tracing::warn!(
                reactor = self.id,
                core = core.id,
                "could not pin the reactor to its core"
            );
        }
        // io-wq belongs to the submitting thread: set its affinity from here, after pinning.
        if let Err(error) = self.router.uring.set_worker_cpus(&self.worker_cpus) {
            tracing::warn!(%error, "cannot set io_uring worker affinity: blocking IO shares the reactor's core");
        }
        if let Some(mut hub) = self.replication.take() {
            let router = &mut self.router;
            hub.start(&mut Stores {
                volumes: &mut router.volumes,
                uring: &mut router.uring,
                done: &mut router.done,
            });
            self.replication = Some(hub);
        }
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        // One clock read per iteration that does not sleep (two when it does): the iteration's `now`
        // serves the spin window, the timers and the requests' latencies.
        let mut last_work = self.now;
        let mut work_started = self.now;
        loop {
            let timeout = self.poll_timeout(last_work);
            let sleeping = timeout != Some(Duration::ZERO);
            let poll_started = if sleeping {
                let now = Instant::now();
                self.pending_busy_ns += (now - work_started).as_nanos() as u64;
                self.publish_loop_metrics();
                now
            } else {
                work_started
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
            self.now = Instant::now();
            let waited = (self.now - poll_started).as_nanos() as u64;
            if sleeping {
                self.pending_idle_ns += waited;
            } else {
                self.pending_busy_ns += waited;
            }
            work_started = self.now;
            self.pending_iterations += 1;
            if self.pending_iterations >= LOOP_METRICS_BATCH {
                self.publish_loop_metrics();
            }
            self.mailbox().woke_up();
            // Replication sockets count as work only through what the hub then does (below): an ack
            // that commits nothing must not restart the adaptive spin, which would hold the core
            // against the fsync worker and block-layer work the host's write is waiting for.
            let mut worked = events
                .iter()
                .any(|event| event.token().0 < REPLICATION_TOKEN_BASE);
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN => {}
                    LISTENER_TOKEN => self.accept(),
                    URING_TOKEN => self.router.uring.drain_eventfd(),
                    token if token.0 >= REPLICATION_TOKEN_BASE => {
                        if let Some(hub) = self.replication.as_mut() {
                            hub.on_event(self.poll.registry(), token);
                        }
                    }
                    Token(token) => {
                        let index = (token - FIRST_CONNECTION_TOKEN) as u32;
                        if let Some(Some(connection)) =
                            self.connections.entries.get_mut(index as usize)
                        {
                            connection.on_ready(event.is_readable() || event.is_read_closed());
                            self.mark_dirty(index);
                        }
                    }
                }
            }
            worked |= self.reap_uring();
            worked |= self.drain_mailbox();
            self.deliver();
            self.end_volume_iterations();
            self.deliver();
            if self.replication.is_some() {
                // A master's local writes go to the device before its notes go to the slave (a
                // loopback send runs the receiver's stack inline); a slave's applied notes get their
                // journal block in this iteration, beside their data, not one iteration later.
                for volume in self.router.volumes.iter_mut().flatten() {
                    volume.push_gathered_writes(&mut self.router.uring);
                }
                if let Err(error) = self.router.uring.submit() {
                    tracing::error!(reactor = self.id, %error, "io_uring submit failed");
                }
                worked |= self.run_replication();
                self.deliver();
                self.end_volume_iterations();
                self.deliver();
            }
            self.run_timers();
            if let Err(error) = self.router.uring.submit() {
                tracing::error!(reactor = self.id, %error, "io_uring submit failed");
            }
            self.router.flush_outbound();
            // No sched_yield in an idle spin: measured, it hands the core to any runnable task, a
            // nice-19 compile included, for a whole slice (QD1 latency +20-29 %, bench/RESULTS.md
            // "A/B ... yielding idle spin"). io-wq workers get cores of their own by default instead.
            if worked {
                last_work = self.now;
            }
            if self.shutdown.is_requested() && self.shutdown_step() {
                tracing::debug!(reactor = self.id, "reactor stopped");
                return Ok(());
            }
        }
    }

    /// Lets the replication hub serve its sockets and drive its peers against the owned volumes;
    /// whether that completed host requests or started device IO (work worth spinning after).
    fn run_replication(&mut self) -> bool {
        let Some(mut hub) = self.replication.take() else {
            return false;
        };
        let router = &mut self.router;
        let before = router.done.len();
        let in_flight_before = router.uring.in_flight();
        hub.run(
            self.poll.registry(),
            &mut Stores {
                volumes: &mut router.volumes,
                uring: &mut router.uring,
                done: &mut router.done,
            },
        );
        let progress = router.done.len() != before || router.uring.in_flight() != in_flight_before;
        router.send_foreign_completions(before);
        self.replication = Some(hub);
        progress
    }

    fn publish_loop_metrics(&mut self) {
        let reactor = &self.metrics.reactors[self.id];
        reactor.iterations.fetch_add(
            std::mem::take(&mut self.pending_iterations),
            Ordering::Relaxed,
        );
        reactor
            .busy_ns
            .fetch_add(std::mem::take(&mut self.pending_busy_ns), Ordering::Relaxed);
        reactor
            .idle_ns
            .fetch_add(std::mem::take(&mut self.pending_idle_ns), Ordering::Relaxed);
    }

    fn mailbox(&self) -> &Mailbox {
        &self.router.mailboxes[self.id]
    }

    /// Work this reactor can do without waiting for an event: completions to deliver, output to
    /// write, connections to pump, or IO a volume has not handed to the device yet.
    fn has_pending_work(&self) -> bool {
        !self.router.done.is_empty()
            || self.router.has_outbound()
            || !self.dirty.is_empty()
            || self
                .router
                .volumes
                .iter()
                .flatten()
                .any(|volume| volume.has_unissued_work())
    }

    /// Zero while there is (or recently was) work to poll for; otherwise sleep until an event or timer.
    fn poll_timeout(&mut self, last_work: Instant) -> Option<Duration> {
        let may_sleep = match self.poll_mode {
            PollMode::Busy => false,
            PollMode::Interrupt => true,
            // Not while an io-wq worker that may run on this core has an operation (a sync): it
            // would wait for the spin to end (the scheduler does not preempt a reactor that sleeps
            // often for a newly woken worker), so every sync would take the whole spin longer.
            // Nor while the host keeps more than one request here with device IO in flight: the
            // kernel's completion work for that IO (block-layer and file-system workers, softirqs)
            // then needs a core as much as the reactor, and the spin would hold one against it; the
            // next completion or request wakes the reactor. A lone request (QD1) keeps the spin,
            // which saves a wake-up when the other cores are idle.
            PollMode::Adaptive => {
                self.now.saturating_duration_since(last_work) >= self.spin
                    || self.workers_share_core && self.router.uring.worker_ops_in_flight() > 0
                    || self.router.requests_in_flight > 1 && self.router.uring.in_flight() > 0
            }
        };
        if !may_sleep || self.has_pending_work() || !self.router.mailboxes[self.id].prepare_sleep()
        {
            return Some(Duration::ZERO);
        }
        if self.router.uring.in_flight() > 0 && self.router.uring.has_completions() {
            self.mailbox().woke_up();
            return Some(Duration::ZERO);
        }
        let timer = self
            .timers
            .peek()
            .map(|Reverse((deadline, _, _))| deadline.saturating_duration_since(Instant::now()));
        match &self.replication {
            Some(hub) => {
                let tick = Duration::from_micros(hub.next_deadline_us());
                Some(timer.map_or(tick, |timer| timer.min(tick)))
            }
            None => timer,
        }
    }

    fn mark_dirty(&mut self, index: u32) {
        let flag = &mut self.connections.dirty[index as usize];
        if !*flag {
            *flag = true;
            self.dirty.push(index);
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::warn!(%peer, %error, "cannot set TCP_NODELAY");
                    }
                    let reactors = self.router.mailboxes.len();
                    let target = self.next_accept_target % reactors;
                    self.next_accept_target = self.next_accept_target.wrapping_add(1);
                    if target == self.id {
                        self.add_connection(stream, peer);
                    } else {
                        self.router.post(target, Message::Accept(stream, peer));
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // EMFILE and friends: log and retry at the next readiness rather than spin.
                    tracing::error!(%error, "accept failed");
                    return;
                }
            }
        }
    }

    fn add_connection(&mut self, mut stream: mio::net::TcpStream, peer: std::net::SocketAddr) {
        if self.draining {
            return;
        }
        let Some((index, generation)) = self.connections.reserve() else {
            tracing::warn!(%peer, limit = CONNECTIONS_PER_REACTOR_MAX, "too many clients on this reactor; closing");
            return;
        };
        let token = Token(FIRST_CONNECTION_TOKEN + index as usize);
        if let Err(error) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%peer, %error, "cannot register client socket");
            self.connections.free.push(index);
            return;
        }
        tracing::debug!(%peer, reactor = self.id, "client connected");
        let origin = Origin {
            reactor: self.id as u16,
            slot: 0,
            connection: index,
            generation,
        };
        self.connections.entries[index as usize] =
            Some(Connection::new(stream, peer, origin, self.metrics.clone()));
        self.connections.live += 1;
        self.timers.push(Reverse((
            Instant::now() + NEGOTIATION_TIMEOUT,
            index,
            generation,
        )));
        self.mark_dirty(index);
    }

    fn close_connection(&mut self, index: u32, reason: CloseReason) {
        let Some(mut connection) = self.connections.entries[index as usize].take() else {
            return;
        };
        let peer = connection.peer();
        if reason.is_orderly() {
            tracing::debug!(%peer, %reason, "client disconnected");
        } else {
            tracing::warn!(%peer, %reason, "client dropped");
        }
        let _ = self.poll.registry().deregister(connection.stream_mut());
        // Requests still in flight complete later against a stale generation and are dropped.
        self.connections.generations[index as usize] =
            self.connections.generations[index as usize].wrapping_add(1);
        self.connections.free.push(index);
        self.connections.live -= 1;
    }

    fn reap_uring(&mut self) -> bool {
        if self.router.uring.in_flight() == 0 {
            return false;
        }
        self.completions.clear();
        if self.router.uring.reap_into(&mut self.completions) == 0 {
            return false;
        }
        for index in 0..self.completions.len() {
            let (user_data, result) = self.completions[index];
            let volume_id = (user_data >> 32) as VolumeId;
            let tag = user_data as u32;
            let before = self.router.done.len();
            let router = &mut self.router;
            if let Some(Some(volume)) = router.volumes.get_mut(volume_id as usize) {
                volume.complete(tag, result, &mut router.uring, &mut router.done);
            }
            self.router.send_foreign_completions(before);
        }
        true
    }

    /// Lets each owned volume write the batch gathered in this iteration (group commit).
    fn end_volume_iterations(&mut self) {
        let router = &mut self.router;
        for index in 0..router.volumes.len() {
            let before = router.done.len();
            if let Some(volume) = router.volumes[index].as_mut() {
                volume.end_iteration(&mut router.uring, &mut router.done);
                if let Some(stats) = volume.copy_stats() {
                    self.metrics.volumes[index].set_copy_stats(&stats);
                }
            }
            router.send_foreign_completions(before);
        }
    }

    fn drain_mailbox(&mut self) -> bool {
        let mut worked = false;
        for from in 0..self.router.mailboxes.len() {
            for _ in 0..MESSAGES_PER_RING_PER_ITERATION {
                let Some(message) = self.router.mailboxes[self.id].take(from) else {
                    break;
                };
                worked = true;
                match message {
                    Message::Io(request) => self.router.submit(request),
                    Message::Done(completion) => self.router.done.push_back(completion),
                    Message::Accept(stream, peer) => self.add_connection(stream, peer),
                }
            }
        }
        worked
    }

    /// Hands completions to their connections and lets every touched connection write and read, until
    /// nothing more happens (a connection's new requests on a memory volume complete immediately).
    fn deliver(&mut self) {
        loop {
            while let Some(completion) = self.router.done.pop_front() {
                self.router.requests_in_flight = self.router.requests_in_flight.saturating_sub(1);
                let Origin {
                    connection,
                    generation,
                    ..
                } = completion.origin;
                if let Some(target) = self.connections.get_mut(connection, generation) {
                    target.complete(completion, self.now);
                    self.mark_dirty(connection);
                }
                // Otherwise the client is gone: dropping the completion frees its buffer.
            }
            if self.dirty.is_empty() {
                return;
            }
            std::mem::swap(&mut self.dirty, &mut self.dirty_spare);
            for position in 0..self.dirty_spare.len() {
                let index = self.dirty_spare[position];
                self.connections.dirty[index as usize] = false;
                let Some(connection) = self.connections.entries[index as usize].as_mut() else {
                    continue;
                };
                if let Err(reason) = connection.pump(&self.exports, &mut self.router, self.now) {
                    self.close_connection(index, reason);
                }
            }
            self.dirty_spare.clear();
        }
    }

    fn run_timers(&mut self) {
        let Some(Reverse((first, _, _))) = self.timers.peek() else {
            return;
        };
        if *first > self.now {
            return;
        }
        let now = self.now;
        while let Some(Reverse((deadline, index, generation))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let expired = self
                .connections
                .get_mut(index, generation)
                .is_some_and(|c| c.is_negotiating());
            if expired {
                self.close_connection(index, CloseReason::NegotiationTimeout);
            }
        }
    }

    /// One step of shutdown; true when this reactor may stop.
    fn shutdown_step(&mut self) -> bool {
        if !self.draining {
            self.draining = true;
            if let Some(mut listener) = self.listener.take() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            for index in 0..self.connections.entries.len() as u32 {
                if let Some(connection) = self.connections.entries[index as usize].as_mut() {
                    connection.begin_drain();
                    self.mark_dirty(index);
                }
            }
            self.deliver();
        }
        if self.connections.live == 0 && !self.counted_drained {
            self.counted_drained = true;
            self.shutdown
                .drained_reactors
                .fetch_add(1, Ordering::SeqCst);
            for mailbox in self.router.mailboxes.iter() {
                mailbox.wake();
            }
        }
        self.counted_drained
            && self.shutdown.drained_reactors.load(Ordering::SeqCst) == self.router.mailboxes.len()
            && self.router.volume_io_in_flight() == 0
            && self.router.done.is_empty()
            && !self.router.has_outbound()
            && self.mailbox().is_empty()
    }
}

/// The reactor's volumes, lent to the replication hub one call at a time.
struct Stores<'a> {
    volumes: &'a mut [Option<Volume>],
    uring: &'a mut Uring,
    done: &'a mut VecDeque<IoCompletion>,
}

impl StoreAccess for Stores<'_> {
    fn with(&mut self, volume: u32, f: &mut dyn FnMut(&mut dyn ReplicaStore)) {
        if let Some(Some(volume)) = self.volumes.get_mut(volume as usize) {
            let mut replica = VolumeReplica {
                volume,
                uring: self.uring,
                done: self.done,
            };
            f(&mut replica);
        }
    }
}
