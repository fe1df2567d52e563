//! One peer of a replicated volume, as a sans-IO state machine: it is fed events (a message received,
//! a link up or down, the authority's answer, the local copy's progress, the clock) and returns
//! actions (send, connect, ask the authority, tell the local copy what it may commit or must apply).
//! It owns no socket, file or clock; the reactor drives it with real ones and the simulator
//! (`replication::sim`) with simulated ones, so that the code under fault injection is the code that
//! serves hosts.
//!
//! Owns: the peer's role and epoch, the link to the other peer, the master's notes not yet committed
//! (to resend after a reconnect), the slave's notes held back after a gap, the master's lease, and
//! the catch-up of a returning peer.
//!
//! Must never: let the master's copy commit an op the slave has not committed (while paired), act on
//! a message of an older epoch, apply a slave's notes out of op order, serve reads without a lease
//! while paired, or report a watermark from a history the master dropped.
//!
//! The rules, in brief (ARCHITECTURE.md, "Replication", has the reasoning):
//! - Paired: the master's commit limit is the slave's acknowledged commit watermark, so every op the
//!   master commits (and acknowledges) is on both copies. The master's lease lasts `lease_timeout`
//!   from the send time of the newest heartbeat the slave echoed; the slave takes over only after
//!   `takeover_timeout` (> lease) without hearing from the master, so the old master has stopped
//!   serving reads before the new one starts.
//! - Any change of membership is a compare-and-swap at the authority on the epoch: exactly one of two
//!   contenders wins; the loser is fenced (its uncommitted notes fail, it stops serving).
//! - A master that restarts takes a new epoch alone: recovery replays every durable note, so its copy
//!   has everything it acknowledged, but it may have lost notes the slave holds; the slave is recorded
//!   as dropped at the restarted copy's watermark.
//! - A dropped peer returns with `base` = its commit watermark, which is never beyond the last op its
//!   history shares with the master's (`Dropped::common_op`; a copy that is, was written by a history
//!   the master dropped and must be reprovisioned: `ResetCopy`); the master sends the current content of
//!   every range changed after `base`, op by op in op order, as of a snapshot at its commit watermark
//!   `K`, then every note after `K`. Once the peer has committed what the master committed, a new epoch
//!   pairs them.

use std::collections::{BTreeMap, VecDeque};

use crate::cluster::authority::{Dropped, Membership};
use crate::replication::message::{Message, NoteMessage};

/// Identifies one connection; a message from any other than the current link is ignored.
pub type LinkId = u64;

/// Times in microseconds of the driver's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_interval_us: u64,
    pub lease_timeout_us: u64,
    pub takeover_timeout_us: u64,
}

impl Timing {
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_us == 0 {
            return Err("the heartbeat interval must be positive".into());
        }
        if self.lease_timeout_us <= self.heartbeat_interval_us {
            return Err("the lease timeout must exceed the heartbeat interval".into());
        }
        if self.takeover_timeout_us <= self.lease_timeout_us {
            return Err("the takeover timeout must exceed the lease timeout".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the authority after recovery.
    Starting,
    /// Serving, paired with an in-sync slave.
    Master,
    /// Serving alone.
    SoloMaster,
    /// Holding an in-sync copy; may take over.
    Slave,
    /// Dropped out of sync; being caught up. Never takes over.
    CatchingUp,
    /// Lost its mastership or its membership; serves nothing.
    Fenced,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Master => "master",
            Role::SoloMaster => "solo-master",
            Role::Slave => "slave",
            Role::CatchingUp => "catching-up",
            Role::Fenced => "fenced",
        }
    }
}

/// The authority's answer to the last request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorityReply {
    Current(Option<Membership>),
    Swapped(Membership),
    Conflict(Membership),
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The local copy recovered; its next op is `committed + 1`. `incomplete`: it was being caught up
    /// (or reprovisioned) and had not finished: it is not a full copy at any op yet.
    Start {
        committed: u64,
        incomplete: bool,
    },
    /// The clock moved; timers are checked.
    Tick,
    ConnectFailed {
        node: String,
    },
    /// An authenticated connection to or from `node`.
    LinkUp {
        link: LinkId,
        node: String,
        initiated: bool,
    },
    LinkDown {
        link: LinkId,
    },
    Received {
        link: LinkId,
        epoch: u64,
        message: Message,
    },
    Authority(AuthorityReply),
    /// The local copy gave a host write (trim, write-zeroes) the next op number (master only).
    NoteCreated(NoteMessage),
    /// The local copy's commit watermark moved.
    Committed {
        through: u64,
    },
    /// Answer to `ResetCopy`: the copy is empty now (its watermark is `committed`).
    CopyReset {
        committed: u64,
    },
    /// Answer to `StartCatchUpSource`: the snapshot holds every op up to `through`.
    CatchUpSnapshot {
        link: LinkId,
        through: u64,
    },
    CatchUpExtent {
        link: LinkId,
        extent: NoteMessage,
    },
    CatchUpEnd {
        link: LinkId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        link: LinkId,
        epoch: u64,
        message: Message,
    },
    Connect {
        node: String,
    },
    Close {
        link: LinkId,
    },
    ReadAuthority,
    CompareAndSwap {
        expected_epoch: u64,
        proposed: Membership,
    },
    /// The local copy may commit notes up to this op (lowered when a pairing starts, never below the
    /// watermark).
    SetCommitLimit {
        through: u64,
    },
    /// Slave: write this note; its op is the copy's next one.
    ApplyNote(NoteMessage),
    /// Drop every note above the commit watermark (failing their host requests); the next op becomes
    /// `committed + 1`.
    DiscardUncommitted,
    /// The copy holds ops of a history the master dropped: empty it (reprovisioning) and answer
    /// `CopyReset`. The driver records the copy as incomplete durably first (so that neither the old
    /// nor the emptied copy restarts as an in-sync slave), waits until it has no IO in flight, then
    /// empties it; it may answer late and more than one `ResetCopy` may come meanwhile (one reset
    /// answers them all). Left unanswered (a reset that failed), the peer waits: safe, not available.
    ResetCopy,
    /// Master: snapshot now (answer `CatchUpSnapshot` before any other event), then stream, op by op in
    /// op order, the content of every range changed after `base` as `CatchUpExtent`s, then `CatchUpEnd`.
    StartCatchUpSource {
        link: LinkId,
        base: u64,
    },
    StopCatchUpSource {
        link: LinkId,
    },
    /// Returning peer: write this item as a note with its op (the op sequence may jump forward).
    ApplyCatchUpExtent(NoteMessage),
    /// Returning peer: once everything before is durable, the watermark becomes at least `through`.
    FinishCatchUp {
        through: u64,
    },
}

/// What a link is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkPhase {
    /// Master side: accepted, waiting for the peer's Hello.
    AwaitHello,
    /// Master side: streaming the snapshot up to `through`.
    SendingCatchUp { through: u64 },
    /// Master side: the catch-up is sent; notes flow.
    Streaming,
    /// Slave side: Hello sent.
    Receiving,
}

#[derive(Debug, Clone)]
struct Link {
    id: LinkId,
    node: String,
    phase: LinkPhase,
    last_heard_us: u64,
}

#[derive(Debug, Clone)]
enum Pending {
    Read,
    Cas(Membership),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    pub role: Role,
    pub epoch: u64,
    pub committed: u64,
    pub peer_acked: Option<u64>,
    pub master_committed: Option<u64>,
    /// The local copy is being caught up and is not whole yet.
    pub incomplete: bool,
}

pub struct Peer {
    node: String,
    timing: Timing,
    role: Role,
    epoch: u64,
    membership: Option<Membership>,
    /// The local copy's commit watermark.
    committed: u64,
    /// The newest op the local copy gave a host write (master): every op a slave can hold is at most
    /// this one.
    last_created: u64,
    commit_limit: u64,
    link: Option<Link>,
    connecting: bool,
    next_connect_us: u64,
    pending: Option<(u64, Pending)>,

    // Master side.
    /// Notes the link may still need: every note above the commit watermark, and while a catch-up is
    /// being sent, every note above its snapshot. In op order, contiguous.
    retained: VecDeque<NoteMessage>,
    /// The slave's commit watermark as it acknowledged it (after its catch-up).
    peer_acked: u64,
    lease_until_us: u64,
    next_heartbeat_us: u64,
    /// Pairing a caught-up peer: the master commits nothing above this until the peer has it.
    pairing_floor: Option<u64>,

    // Slave side.
    /// Notes after a gap, by op.
    held: BTreeMap<u64, NoteMessage>,
    /// The highest op handed to the local copy.
    delivered: u64,
    /// Returning peer: the last op its history shares with the master's.
    common_op: u64,
    /// Returning peer: its copy is ready for a Hello (reset if it had to be).
    ready: bool,
    /// Returning peer: Finish sent; its state is now a prefix of the master's history.
    caught_up: bool,
    /// Returning peer: the snapshot op of a finish the local copy has not confirmed yet.
    finishing: Option<u64>,
    /// The local copy is not whole: a catch-up (or reprovisioning) started and has not finished.
    incomplete: bool,
    /// When this slave last heard from its master (starts its takeover timer).
    master_heard_us: u64,
    last_echo_us: u64,
    master_committed: Option<u64>,
    /// Messages of a newer epoch from the master, kept while the authority is read.
    stash: Vec<(u64, Message)>,
}

impl Peer {
    pub fn new(node: &str, timing: Timing) -> Peer {
        assert!(timing.validate().is_ok(), "invalid replication timing");
        Peer {
            node: node.to_string(),
            timing,
            role: Role::Starting,
            epoch: 0,
            membership: None,
            committed: 0,
            last_created: 0,
            commit_limit: u64::MAX,
            link: None,
            connecting: false,
            next_connect_us: 0,
            pending: None,
            retained: VecDeque::new(),
            peer_acked: 0,
            lease_until_us: 0,
            next_heartbeat_us: 0,
            pairing_floor: None,
            held: BTreeMap::new(),
            delivered: 0,
            common_op: 0,
            ready: false,
            caught_up: false,
            finishing: None,
            incomplete: false,
            master_heard_us: 0,
            last_echo_us: 0,
            master_committed: None,
            stash: Vec::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn membership(&self) -> Option<&Membership> {
        self.membership.as_ref()
    }

    pub fn status(&self) -> PeerStatus {
        PeerStatus {
            role: self.role,
            epoch: self.epoch,
            committed: self.committed,
            peer_acked: matches!(self.role, Role::Master | Role::SoloMaster)
                .then_some(self.peer_acked)
                .filter(|_| self.link.is_some()),
            master_committed: self.master_committed,
            incomplete: self.incomplete,
        }
    }

    /// Whether the volume's export is offered (writes are accepted; they commit per the rules).
    pub fn exports(&self) -> bool {
        matches!(self.role, Role::Master | Role::SoloMaster)
    }

    /// Whether reads may be served now: a paired master needs its lease.
    pub fn serves_reads(&self, now_us: u64) -> bool {
        match self.role {
            // A pairing proposal that may already have won makes the peer an in-sync slave, which
            // may take over: from the proposal on, reads need the lease as when paired.
            Role::SoloMaster => !self.pairing_proposed() || now_us < self.lease_until_us,
            Role::Master => now_us < self.lease_until_us,
            _ => false,
        }
    }

    fn pairing_proposed(&self) -> bool {
        matches!(&self.pending, Some((_, Pending::Cas(proposed))) if proposed.slave.is_some())
    }

    pub fn handle(&mut self, now_us: u64, event: Event, actions: &mut Vec<Action>) {
        match event {
            Event::Start {
                committed,
                incomplete,
            } => {
                self.incomplete = incomplete;
                assert_eq!(self.role, Role::Starting, "a peer starts once");
                self.committed = committed;
                self.delivered = committed;
                self.last_created = committed;
                self.request(now_us, Pending::Read, actions);
            }
            Event::Tick => self.tick(now_us, actions),
            Event::ConnectFailed { .. } => {
                self.connecting = false;
                self.next_connect_us = now_us + self.timing.heartbeat_interval_us;
            }
            Event::LinkUp {
                link,
                node,
                initiated,
            } => self.link_up(now_us, link, node, initiated, actions),
            Event::LinkDown { link } => {
                if self.link.as_ref().is_some_and(|current| current.id == link) {
                    self.drop_link(actions, false);
                }
            }
            Event::Received {
                link,
                epoch,
                message,
            } => {
                if self.link.as_ref().is_some_and(|current| current.id == link) {
                    self.received(now_us, epoch, message, actions);
                }
            }
            Event::Authority(reply) => self.authority_reply(now_us, reply, actions),
            Event::NoteCreated(note) => {
                self.last_created = self.last_created.max(note.op);
                self.note_created(note, actions)
            }
            Event::Committed { through } => self.committed_through(through, actions),
            Event::CopyReset { committed } => {
                // Whatever the role by now (a membership may have moved on while the driver waited
                // for the copy to be idle), the copy is empty: never whole again until caught up.
                self.incomplete = true;
                self.committed = committed;
                self.delivered = committed;
                if self.role == Role::CatchingUp && !self.ready {
                    tracing::warn!(node = %self.node, "copy reset: reprovisioning from the master");
                    self.ready = true;
                    self.next_connect_us = now_us;
                }
            }
            Event::CatchUpSnapshot { link, through } => {
                if let Some(current) = self.link.as_mut().filter(|current| current.id == link) {
                    debug_assert!(through >= self.committed.min(through));
                    current.phase = LinkPhase::SendingCatchUp { through };
                }
            }
            Event::CatchUpExtent { link, extent } => {
                if self.link.as_ref().is_some_and(|current| current.id == link) {
                    self.send(link, Message::CatchUpExtent(extent), actions);
                }
            }
            Event::CatchUpEnd { link } => self.catch_up_end(link, actions),
        }
    }

    // ---- authority ----

    fn request(&mut self, now_us: u64, request: Pending, actions: &mut Vec<Action>) {
        match &request {
            Pending::Read => actions.push(Action::ReadAuthority),
            Pending::Cas(proposed) => actions.push(Action::CompareAndSwap {
                expected_epoch: self.membership.as_ref().map_or(0, |m| m.epoch),
                proposed: proposed.clone(),
            }),
        }
        self.pending = Some((now_us, request));
    }

    fn read_authority(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if self.pending.is_none() {
            self.request(now_us, Pending::Read, actions);
        }
    }

    fn propose(&mut self, now_us: u64, proposed: Membership, actions: &mut Vec<Action>) {
        assert!(
            proposed.epoch > self.membership.as_ref().map_or(0, |m| m.epoch),
            "a proposal takes a new epoch"
        );
        if self.pending.is_none() {
            self.request(now_us, Pending::Cas(proposed), actions);
        }
    }

    fn authority_reply(&mut self, now_us: u64, reply: AuthorityReply, actions: &mut Vec<Action>) {
        let pending = self.pending.take().map(|(_, request)| request);
        match reply {
            AuthorityReply::Unavailable => {
                // Retried by the timer.
                self.pending = pending.map(|request| (now_us, request));
            }
            AuthorityReply::Current(None) => {
                tracing::error!(node = %self.node, "the authority has no membership for this volume");
                self.fence(actions);
            }
            AuthorityReply::Current(Some(membership)) => self.adopt(now_us, membership, actions),
            AuthorityReply::Swapped(membership) => self.swapped(now_us, membership, actions),
            AuthorityReply::Conflict(current) => {
                // A retried CAS whose first attempt succeeded finds its own proposal.
                if matches!(&pending, Some(Pending::Cas(proposed)) if *proposed == current) {
                    self.swapped(now_us, current, actions);
                } else {
                    self.adopt(now_us, current, actions);
                    // A failed pairing of a master that is still master alone: what was gated for it
                    // is free again (never before the authority said so: a fenced one stays gated).
                    if self.role == Role::SoloMaster
                        && self.link.is_none()
                        && self.pairing_floor.take().is_some()
                    {
                        self.set_commit_limit(u64::MAX, actions);
                    }
                }
            }
        }
    }

    fn swapped(&mut self, now_us: u64, membership: Membership, actions: &mut Vec<Action>) {
        if membership.epoch <= self.epoch {
            return;
        }
        if membership.master != self.node {
            // This peer's own request to be dropped (named in-sync while incomplete): follow it.
            self.adopt(now_us, membership, actions);
            return;
        }
        let was = self.role;
        self.epoch = membership.epoch;
        self.membership = Some(membership.clone());
        if membership.slave.is_some() {
            tracing::info!(node = %self.node, epoch = self.epoch, "paired with an in-sync slave");
            self.role = Role::Master;
            self.pairing_floor = None;
        } else {
            tracing::info!(node = %self.node, epoch = self.epoch, "serving alone (solo master)");
            if matches!(was, Role::Slave | Role::Starting | Role::CatchingUp) {
                // A taker drops what the old master never had committed on both copies.
                self.held.clear();
                self.stash.clear();
                actions.push(Action::DiscardUncommitted);
                self.delivered = self.committed;
                self.retained.clear();
                self.drop_link(actions, true);
            }
            self.role = Role::SoloMaster;
            self.pairing_floor = None;
            self.set_commit_limit(u64::MAX, actions);
        }
        self.next_heartbeat_us = now_us;
        self.tick(now_us, actions);
    }

    /// Follows a membership read from the authority (or found by a failed CAS).
    fn adopt(&mut self, now_us: u64, membership: Membership, actions: &mut Vec<Action>) {
        if membership.epoch < self.epoch {
            return;
        }
        let acting_master = matches!(self.role, Role::Master | Role::SoloMaster);
        if membership.master == self.node {
            if membership.epoch == self.epoch && acting_master {
                return;
            }
            // Restarted (or lost track): recovery replayed every durable note, so this copy has every
            // op it acknowledged, perhaps not every op the slave holds: take a new epoch alone, with
            // the slave dropped at this copy's watermark (a dropped peer ahead of its common op is
            // reprovisioned).
            self.membership = Some(membership.clone());
            let dropped = match (&membership.slave, &membership.dropped) {
                (Some(slave), _) => Some(Dropped {
                    node: slave.clone(),
                    common_op: self.committed,
                }),
                (None, dropped) => dropped.as_ref().map(|dropped| Dropped {
                    node: dropped.node.clone(),
                    common_op: dropped.common_op.min(self.committed),
                }),
            };
            let proposed = Membership {
                epoch: membership.epoch + 1,
                master: self.node.clone(),
                slave: None,
                dropped,
            };
            self.propose(now_us, proposed, actions);
            return;
        }
        if acting_master {
            tracing::warn!(node = %self.node, epoch = membership.epoch, master = %membership.master,
                "another peer is master: fenced");
            self.fence(actions);
        }
        let stash = std::mem::take(&mut self.stash);
        let link_node = self.link.as_ref().map(|link| link.node.clone());
        self.membership = Some(membership.clone());
        let catching_up = self.role == Role::CatchingUp && !(self.caught_up && self.ready);
        let in_sync_copy = !self.incomplete && !catching_up;
        if membership.slave.as_deref() == Some(self.node.as_str()) && !in_sync_copy {
            // Named the in-sync slave (a pairing raced with a crash or a reset of this copy), but this
            // copy is not whole: it must never take over. Ask to be dropped instead.
            tracing::warn!(node = %self.node, epoch = membership.epoch,
                "named in-sync slave while this copy is incomplete: asking to be dropped");
            let proposed = Membership {
                epoch: membership.epoch + 1,
                master: membership.master.clone(),
                slave: None,
                dropped: Some(Dropped {
                    node: self.node.clone(),
                    common_op: self.committed,
                }),
            };
            self.drop_link(actions, true);
            self.propose(now_us, proposed, actions);
            return;
        }
        if membership.slave.as_deref() == Some(self.node.as_str()) {
            let continuing = matches!(self.role, Role::Slave)
                || (self.role == Role::CatchingUp && self.caught_up);
            self.role = Role::Slave;
            self.epoch = membership.epoch;
            self.last_echo_us = 0;
            self.set_commit_limit(u64::MAX, actions);
            if continuing && link_node.as_deref() == Some(membership.master.as_str()) {
                // The master's newer-epoch messages kept while reading: still ours to follow.
                for (epoch, message) in stash {
                    if epoch <= self.epoch {
                        self.received(now_us, epoch, message, actions);
                    }
                }
            } else {
                self.drop_link(actions, true);
            }
            self.link_heard(now_us);
        } else if let Some(dropped) = membership
            .dropped
            .as_ref()
            .filter(|dropped| dropped.node == self.node)
        {
            if self.role == Role::CatchingUp && self.epoch == membership.epoch {
                return;
            }
            self.role = Role::CatchingUp;
            self.epoch = membership.epoch;
            self.set_commit_limit(u64::MAX, actions);
            self.common_op = dropped.common_op;
            self.caught_up = false;
            self.finishing = None;
            self.held.clear();
            self.drop_link(actions, true);
            actions.push(Action::DiscardUncommitted);
            self.delivered = self.committed;
            if self.committed > self.common_op {
                // Ops beyond the common one come from a history the master dropped.
                tracing::error!(node = %self.node, committed = self.committed, common = self.common_op,
                    "this copy holds ops of a dropped history: it must be reprovisioned");
                self.ready = false;
                actions.push(Action::ResetCopy);
            } else {
                self.ready = true;
            }
        } else {
            tracing::warn!(node = %self.node, epoch = membership.epoch, "not a member of the volume: fenced");
            self.epoch = membership.epoch;
            self.fence(actions);
        }
    }

    /// Stops acting as master: uncommitted notes fail, nothing is served.
    fn fence(&mut self, actions: &mut Vec<Action>) {
        if matches!(self.role, Role::Master | Role::SoloMaster) {
            // Nothing more commits here until the next membership says what this copy is.
            let committed = self.committed;
            self.set_commit_limit(committed, actions);
            actions.push(Action::DiscardUncommitted);
            self.retained.clear();
            self.pairing_floor = None;
        }
        self.drop_link(actions, true);
        self.role = Role::Fenced;
    }

    // ---- timers ----

    fn tick(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if let Some((sent_us, request)) = &self.pending
            && now_us >= sent_us + self.timing.lease_timeout_us
        {
            let request = request.clone();
            self.pending = None;
            self.request(now_us, request, actions);
        }
        match self.role {
            Role::Starting => {}
            Role::Fenced => {
                // Keep looking: the membership may name this peer again (as a dropped peer).
                if self.pending.is_none() && now_us >= self.next_connect_us {
                    self.next_connect_us = now_us + self.timing.lease_timeout_us;
                    self.read_authority(now_us, actions);
                }
            }
            Role::Master | Role::SoloMaster => self.tick_master(now_us, actions),
            Role::Slave | Role::CatchingUp => self.tick_slave(now_us, actions),
        }
    }

    fn tick_master(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let epoch = self.epoch;
        if let Some(link) = &self.link {
            if now_us.saturating_sub(link.last_heard_us) > self.timing.takeover_timeout_us {
                tracing::info!(node = %self.node, peer = %link.node, "peer silent: closing its link");
                self.drop_link(actions, true);
            } else if link.phase != LinkPhase::AwaitHello && now_us >= self.next_heartbeat_us {
                self.next_heartbeat_us = now_us + self.timing.heartbeat_interval_us;
                let message = Message::Heartbeat {
                    sent_at: now_us,
                    committed: self.committed,
                };
                let link = link.id;
                actions.push(Action::Send {
                    link,
                    epoch,
                    message,
                });
            }
        }
        if self.role == Role::Master && now_us >= self.lease_until_us && self.pending.is_none() {
            let Some(slave) = self.membership.as_ref().and_then(|m| m.slave.clone()) else {
                return;
            };
            tracing::warn!(node = %self.node, %slave, "lease expired: going on alone");
            // Every op the slave holds came from this master, which commits all it created.
            let proposed = Membership {
                epoch: self.epoch + 1,
                master: self.node.clone(),
                slave: None,
                dropped: Some(Dropped {
                    node: slave,
                    common_op: self.committed.max(self.last_created),
                }),
            };
            self.propose(now_us, proposed, actions);
        }
    }

    fn tick_slave(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let Some(master) = self.membership.as_ref().map(|m| m.master.clone()) else {
            return;
        };
        if self.role == Role::Slave
            && now_us >= self.master_heard_us + self.timing.takeover_timeout_us
            && self.pending.is_none()
        {
            tracing::warn!(node = %self.node, %master, "master silent: taking over");
            let proposed = Membership {
                epoch: self.epoch + 1,
                master: self.node.clone(),
                slave: None,
                dropped: Some(Dropped {
                    node: master.clone(),
                    common_op: self.committed,
                }),
            };
            self.propose(now_us, proposed, actions);
            return;
        }
        if let Some(link) = &self.link {
            if now_us.saturating_sub(link.last_heard_us) > self.timing.lease_timeout_us {
                self.drop_link(actions, true);
            }
        } else if !self.connecting
            && now_us >= self.next_connect_us
            && (self.role == Role::Slave || self.ready)
        {
            self.connecting = true;
            self.next_connect_us = now_us + self.timing.heartbeat_interval_us;
            actions.push(Action::Connect { node: master });
        }
    }

    // ---- links ----

    fn link_up(
        &mut self,
        now_us: u64,
        link: LinkId,
        node: String,
        initiated: bool,
        actions: &mut Vec<Action>,
    ) {
        if initiated {
            self.connecting = false;
            let expected = self.membership.as_ref().map(|m| m.master.as_str());
            let ready = match self.role {
                Role::Slave => true,
                Role::CatchingUp => self.ready,
                _ => false,
            };
            if !ready || expected != Some(node.as_str()) {
                actions.push(Action::Close { link });
                return;
            }
            self.drop_link(actions, true);
            self.link = Some(Link {
                id: link,
                node,
                phase: LinkPhase::Receiving,
                last_heard_us: now_us,
            });
            let (base, rejoin) = if self.role == Role::CatchingUp && !self.caught_up {
                // What an interrupted catch-up left uncommitted (items, a finish, notes after it) is
                // dropped: this one starts again from the watermark.
                self.finishing = None;
                if self.delivered > self.committed {
                    actions.push(Action::DiscardUncommitted);
                    self.delivered = self.committed;
                }
                self.held.clear();
                (self.committed, true)
            } else {
                // Every op up to `delivered` is in the local copy's log and commits in order: the
                // catch-up need not (and must not: it would overwrite newer notes with older extents)
                // resend any of it.
                (self.delivered, false)
            };
            let hello = Message::Hello {
                node: self.node.clone(),
                base,
                rejoin,
                repair: Vec::new(),
            };
            self.send(link, hello, actions);
            return;
        }
        let wanted = self.membership.as_ref().is_some_and(|m| {
            m.slave.as_deref() == Some(node.as_str())
                || m.dropped.as_ref().is_some_and(|d| d.node == node)
        });
        if !matches!(self.role, Role::Master | Role::SoloMaster) || !wanted {
            tracing::warn!(node = %self.node, peer = %node, role = self.role.name(), "refusing a replication link");
            actions.push(Action::Close { link });
            return;
        }
        self.drop_link(actions, true);
        self.link = Some(Link {
            id: link,
            node,
            phase: LinkPhase::AwaitHello,
            last_heard_us: now_us,
        });
    }

    /// Forgets the current link (closing it when `close`), and whatever depended on it.
    fn drop_link(&mut self, actions: &mut Vec<Action>, close: bool) {
        let Some(link) = self.link.take() else {
            return;
        };
        if close {
            actions.push(Action::Close { link: link.id });
        }
        if let LinkPhase::SendingCatchUp { .. } = link.phase {
            actions.push(Action::StopCatchUpSource { link: link.id });
        }
        self.stash.clear();
        // A pairing whose CAS is out stays gated until the authority answers: it may have succeeded.
        let pairing_proposed =
            matches!(&self.pending, Some((_, Pending::Cas(proposed))) if proposed.slave.is_some());
        if self.role == Role::SoloMaster && !pairing_proposed && self.pairing_floor.take().is_some()
        {
            self.set_commit_limit(u64::MAX, actions);
        }
        self.trim_retained();
    }

    fn link_heard(&mut self, now_us: u64) {
        if let Some(link) = self.link.as_mut() {
            link.last_heard_us = now_us;
        }
        self.master_heard_us = now_us;
    }

    fn send(&mut self, link: LinkId, message: Message, actions: &mut Vec<Action>) {
        actions.push(Action::Send {
            link,
            epoch: self.epoch,
            message,
        });
    }

    fn received(&mut self, now_us: u64, epoch: u64, message: Message, actions: &mut Vec<Action>) {
        let Some(link) = self.link.clone() else {
            return;
        };
        if self.role == Role::Slave && self.taking_over() {
            // An echo now would renew the lease of the master this peer is replacing: the takeover
            // is safe only because that lease ran out before the proposal.
            self.drop_link(actions, true);
            return;
        }
        if epoch < self.epoch {
            tracing::info!(node = %self.node, peer = %link.node, epoch, current = self.epoch,
                "stale-epoch message refused");
            self.send(link.id, Message::Stale { epoch: self.epoch }, actions);
            self.drop_link(actions, true);
            return;
        }
        if epoch > self.epoch {
            if matches!(self.role, Role::Slave | Role::CatchingUp)
                && matches!(link.phase, LinkPhase::Receiving)
            {
                // Probably the master paired us: keep its messages until the authority confirms.
                self.stash.push((epoch, message));
                self.read_authority(now_us, actions);
            } else {
                // A master is fenced only by what the authority says (its own proposal for this
                // epoch may be the one that won): until then it cannot commit past its slave anyway.
                tracing::warn!(node = %self.node, epoch, current = self.epoch, "newer epoch seen");
                self.drop_link(actions, true);
                self.read_authority(now_us, actions);
            }
            return;
        }
        if !self.stash.is_empty() {
            self.stash.push((epoch, message));
            return;
        }
        if let Some(current) = self.link.as_mut() {
            current.last_heard_us = now_us;
        }
        match (self.role, message) {
            (_, Message::Stale { epoch: newer }) => {
                tracing::info!(node = %self.node, newer, "peer is at a newer epoch");
                self.drop_link(actions, true);
                self.read_authority(now_us, actions);
            }
            (
                Role::Master | Role::SoloMaster,
                Message::Hello {
                    node, base, rejoin, ..
                },
            ) => self.hello(now_us, &link, node, base, rejoin, actions),
            (Role::Master | Role::SoloMaster, Message::Ack { committed, echo }) => {
                self.ack(now_us, &link, committed, echo, actions)
            }
            (Role::Slave | Role::CatchingUp, message) => {
                self.master_heard_us = now_us;
                self.slave_received(now_us, link.id, message, actions);
            }
            (role, message) => {
                tracing::warn!(node = %self.node, role = role.name(), ?message, "unexpected message: closing the link");
                self.drop_link(actions, true);
            }
        }
    }

    // ---- master ----

    #[allow(clippy::too_many_arguments)]
    fn hello(
        &mut self,
        now_us: u64,
        link: &Link,
        node: String,
        base: u64,
        rejoin: bool,
        actions: &mut Vec<Action>,
    ) {
        if link.phase != LinkPhase::AwaitHello || node != link.node {
            tracing::warn!(node = %self.node, peer = %link.node, "unexpected Hello: closing the link");
            self.drop_link(actions, true);
            return;
        }
        let in_sync = self
            .membership
            .as_ref()
            .is_some_and(|m| m.slave.as_deref() == Some(node.as_str()));
        if !in_sync || rejoin {
            // Its acknowledgements so far were about a history this master may not share.
            self.peer_acked = 0;
        }
        if let Some(current) = self.link.as_mut() {
            current.last_heard_us = now_us;
        }
        tracing::info!(node = %self.node, peer = %node, base, rejoin, "catching up a peer");
        actions.push(Action::StartCatchUpSource {
            link: link.id,
            base,
        });
    }

    fn catch_up_end(&mut self, link: LinkId, actions: &mut Vec<Action>) {
        let Some(current) = self.link.as_mut().filter(|current| current.id == link) else {
            return;
        };
        let LinkPhase::SendingCatchUp { through } = current.phase else {
            return;
        };
        current.phase = LinkPhase::Streaming;
        self.send(link, Message::CatchUpDone { through }, actions);
        let notes: Vec<NoteMessage> = self
            .retained
            .iter()
            .filter(|note| note.op > through)
            .cloned()
            .collect();
        for note in notes {
            self.send(link, Message::Note(note), actions);
        }
        self.trim_retained();
    }

    fn ack(
        &mut self,
        now_us: u64,
        link: &Link,
        committed: u64,
        echo: u64,
        actions: &mut Vec<Action>,
    ) {
        if link.phase != LinkPhase::Streaming {
            return;
        }
        if echo <= now_us {
            self.lease_until_us = self.lease_until_us.max(echo + self.timing.lease_timeout_us);
        }
        self.peer_acked = self.peer_acked.max(committed);
        match self.role {
            Role::Master => self.set_commit_limit(self.peer_acked, actions),
            Role::SoloMaster => {
                // The peer holds the snapshot: from now on the master commits only what the peer has
                // too, and pairs with it once it has everything committed before that.
                let floor = *self.pairing_floor.get_or_insert(self.committed);
                self.set_commit_limit(floor.max(self.peer_acked), actions);
                let dropped = self.membership.as_ref().and_then(|m| m.dropped.clone());
                if self.peer_acked >= floor
                    && self.pending.is_none()
                    && dropped.as_ref().is_some_and(|d| d.node == link.node)
                    && now_us < self.lease_until_us
                {
                    let proposed = Membership {
                        epoch: self.epoch + 1,
                        master: self.node.clone(),
                        slave: Some(link.node.clone()),
                        dropped: None,
                    };
                    self.propose(now_us, proposed, actions);
                }
            }
            _ => {}
        }
    }

    fn set_commit_limit(&mut self, through: u64, actions: &mut Vec<Action>) {
        // What is committed stays committed: a limit never goes below the watermark.
        let through = through.max(self.committed);
        if through != self.commit_limit {
            self.commit_limit = through;
            actions.push(Action::SetCommitLimit { through });
        }
    }

    fn note_created(&mut self, note: NoteMessage, actions: &mut Vec<Action>) {
        if !matches!(self.role, Role::Master | Role::SoloMaster) {
            // A host write the copy accepted just before this peer lost its mastership (the driver
            // learns of the change at the end of its pass): it must not commit here.
            actions.push(Action::DiscardUncommitted);
            return;
        }
        if let Some(last) = self.retained.back() {
            assert_eq!(note.op, last.op + 1, "notes are created in op order");
        }
        if let Some(link) = self
            .link
            .as_ref()
            .filter(|link| link.phase == LinkPhase::Streaming)
        {
            let link = link.id;
            self.send(link, Message::Note(note.clone()), actions);
        }
        self.retained.push_back(note);
    }

    fn committed_through(&mut self, through: u64, actions: &mut Vec<Action>) {
        self.committed = through;
        if let Some(snapshot) = self.finishing.filter(|&snapshot| through >= snapshot) {
            self.finishing = None;
            self.caught_up = true;
            self.incomplete = false;
            self.common_op = snapshot;
        }
        if matches!(self.role, Role::Slave | Role::CatchingUp) {
            self.delivered = self.delivered.max(through);
            self.send_ack(actions);
        } else {
            self.trim_retained();
        }
    }

    fn trim_retained(&mut self) {
        let floor = match self.link.as_ref().map(|link| &link.phase) {
            Some(LinkPhase::SendingCatchUp { through }) => self.committed.min(*through),
            Some(LinkPhase::AwaitHello) => self.committed,
            _ => self.committed,
        };
        while self.retained.front().is_some_and(|note| note.op <= floor) {
            self.retained.pop_front();
        }
    }

    // ---- slave ----

    fn slave_received(
        &mut self,
        now_us: u64,
        link: LinkId,
        message: Message,
        actions: &mut Vec<Action>,
    ) {
        match message {
            Message::Heartbeat { sent_at, committed } => {
                self.last_echo_us = sent_at;
                self.master_committed = Some(committed);
                self.send_ack(actions);
            }
            Message::CatchUpExtent(extent) => {
                // Items come in op order; each one is in the local log from now on.
                self.delivered = self.delivered.max(extent.op);
                self.incomplete = true;
                actions.push(Action::ApplyCatchUpExtent(extent));
            }
            Message::CatchUpDone { through } => {
                if self.role == Role::CatchingUp && !self.caught_up {
                    if through <= self.committed {
                        // Every item (each op <= through) is committed already.
                        self.caught_up = true;
                        self.incomplete = false;
                        self.common_op = through;
                    } else {
                        // In sync only once the local copy confirms the finish as durable.
                        self.finishing = Some(through);
                    }
                }
                actions.push(Action::FinishCatchUp { through });
                let now_holds = self.delivered.max(through);
                self.delivered = now_holds;
                self.held = self.held.split_off(&(now_holds + 1));
                self.deliver(actions);
            }
            Message::Note(note) => {
                if note.op > self.delivered {
                    self.held.insert(note.op, note);
                    self.deliver(actions);
                }
            }
            other => {
                tracing::warn!(node = %self.node, message = ?other, "unexpected message for a slave");
                let _ = (now_us, link);
                self.drop_link(actions, true);
            }
        }
    }

    fn deliver(&mut self, actions: &mut Vec<Action>) {
        while let Some(note) = self.held.remove(&(self.delivered + 1)) {
            self.delivered = note.op;
            actions.push(Action::ApplyNote(note));
        }
    }

    fn taking_over(&self) -> bool {
        matches!(&self.pending, Some((_, Pending::Cas(proposed))) if proposed.master == self.node)
    }

    fn send_ack(&mut self, actions: &mut Vec<Action>) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let committed = if self.role == Role::CatchingUp && !self.caught_up {
            // Until the catch-up is finished, nothing above the base is the master's history.
            self.committed.min(self.common_op)
        } else {
            self.committed
        };
        let link = link.id;
        let echo = self.last_echo_us;
        self.send(link, Message::Ack { committed, echo }, actions);
    }
}
