//! The replication messages, as data. `wire` turns them into bytes and back; `peer` decides what to
//! send and what a received one means. Every message travels in a frame that also carries the volume
//! and the sender's epoch (see `wire`), so neither is repeated here.

/// What a note (or a catch-up extent) does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// New data for the range.
    Write,
    /// The range was trimmed: it reads as zeroes and holds no data.
    Trim,
    /// The range was written with zeroes.
    Zero,
}

/// One note, as the master streams it: an op number and what the op did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteMessage {
    pub op: u64,
    pub kind: NoteKind,
    pub offset: u64,
    pub length: u64,
    /// The data of a `Write` (exactly `length` bytes); empty for `Trim` and `Zero`.
    pub data: Vec<u8>,
}

/// A byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message of a slave (or returning peer) on a new link: "I hold every op up to `base` of
    /// your history; also send me the current content of `repair` (ranges I changed in a history you
    /// dropped); `rejoin` says that my notes after `base` are void."
    Hello {
        node: String,
        base: u64,
        rejoin: bool,
        repair: Vec<ByteRange>,
    },
    /// Catch-up: the current content of a range as of the master's snapshot, with the op that wrote
    /// it. `kind` is `Write` (with data) or `Zero` (reads as zeroes).
    CatchUpExtent(NoteMessage),
    /// Catch-up complete: the receiver now holds every op up to `through`; notes follow.
    CatchUpDone { through: u64 },
    /// A note of the live stream, in op order on one link.
    Note(NoteMessage),
    /// Master to slave, every heartbeat interval: renews the master's lease when echoed.
    Heartbeat { sent_at: u64, committed: u64 },
    /// Slave to master: its commit watermark, and the newest heartbeat `sent_at` it has seen.
    Ack { committed: u64, echo: u64 },
    /// A refusal: the sender is at `epoch`, newer than the message it refuses.
    Stale { epoch: u64 },
}

/// One item of a catch-up source's stream (the master's copy produces them, the hub sends them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUpItem {
    /// The snapshot's content of one op's range: every extent of the snapshot whose op is this op,
    /// merged into one range (`offset`..`offset + length`) that spans them; what lies between them is
    /// sent with the snapshot's current content (a later op's data or zeros), which that later op's
    /// own item sends again. `kind` is `Write` (with data) or `Zero` (the whole range reads as zeros).
    Extent(NoteMessage),
    /// Every item was produced.
    End,
}
