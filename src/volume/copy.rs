//! A volume copy: one peer's durable storage of a volume, built of notes, op numbers and commits.
//!
//! Owns: the committed extent map (the readable state), the data-area allocator, the note log (journal
//! blocks in flight, notes awaiting commit), checkpoints, the reads in flight, and the catch-up
//! sources (snapshots being streamed to a returning peer, with their reads).
//!
//! Write path: a write gets data space and the next op number; its data goes to the new space and its
//! note record into the journal block of this reactor iteration. When the block and the data are durable
//! (one fdatasync for the whole batch, or RWF_DSYNC writes) the notes are committed strictly in op order:
//! inserted into the extent map, which makes them readable, and only then acknowledged. A lone write
//! is an inline note instead: block and data in one journal write, the data copied to its space
//! later (see `VolumeCopy::homes`). Space the commit
//! overwrites is freed once no read that could still be using it is in flight. `Durability::WriteBack`
//! is the one exception to "durable before readable": there a note commits once written (the
//! device's volatile cache holds it, so a process crash cannot lose it), and only FLUSH, FUA and the
//! copy's own needs (space reuse, checkpoints, journal room) wait for a sync.
//!
//! Must never: make a note readable before it is durable (write-back: before it is written), commit
//! out of op order, acknowledge a write that failed or is not durable (write-back: a FUA write, or a
//! FLUSH, before what it covers is durable), reuse data space a committed extent, an in-flight read or a running
//! catch-up source's snapshot still uses (or before the block after its freeing commit is vouched for:
//! see `vouched_before`), overwrite journal blocks that recovery would still need, or commit (or let
//! a journal watermark cover) part of a catch-up op.

use std::collections::VecDeque;

use crate::alloc::Allocator;
use crate::btree::{Extent, ExtentMap, Location, Mapping, Piece};
use crate::io::AlignedBuf;
use crate::io::device::Device;
use crate::journal::format::{
    self, BlockHeader, BlockKind, CheckpointDone, EXTENTS_PER_BLOCK, ExtentRecord,
    INLINE_SLOTS_MAX, JOURNAL_BLOCK_BYTES, LOCATION_ZERO, NOTES_PER_BLOCK, NoteKind, NoteRecord,
};
use crate::journal::recovery::{JOURNAL_BLOCKS_IN_FLIGHT_MAX, Recovered};
use crate::journal::superblock::Superblock;
use crate::replication::message::{self as replication, NoteMessage};
use crate::volume::{
    EXTENT_HOLE, EXTENT_ZERO, EXTENTS_PER_REPLY_MAX, IoCompletion, IoFlags, IoKind, IoRequest,
    Origin, VolumeError, push_extent,
};

/// How notes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Plain writes, then one fdatasync per batch.
    Fdatasync,
    /// Every data and journal write with RWF_DSYNC (FUA on devices that have it); no separate sync.
    Dsync,
    /// A disk with a volatile write cache, as NBD defines one (and as `qemu-nbd --cache=none`
    /// serves): a write is acknowledged (and readable) once its note and data are written to the
    /// device, not yet synced; FLUSH makes every acknowledged write durable and a FUA write is
    /// acknowledged only once durable (one fdatasync for all waiting). A process crash loses nothing
    /// acknowledged; a power cut may lose writes no FLUSH or FUA covered, always back to an op-order
    /// prefix. Single-node volumes only: a replicated write is acknowledged durable on both copies.
    WriteBack,
}

/// Why a note or extent from a replication peer was refused (nothing was changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("note op {got} out of order: the copy's next op is {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("range {offset} + {length} is empty, misaligned or outside the volume")]
    Range { offset: u64, length: u64 },
    #[error("{got} data bytes where the note needs {expected}")]
    DataLength { expected: usize, got: usize },
}

/// Device operations one volume copy keeps in flight at most.
pub const DEVICE_OPS_MAX: usize = 512;
/// Checkpoint blocks produced per reactor iteration, so that a checkpoint never stalls host IO.
const CHECKPOINT_BLOCKS_PER_ITERATION: usize = 16;
/// Volume bytes a checkpoint step scans per lookup.
const CHECKPOINT_SCAN_BYTES: u64 = 4 << 20;
/// Source of the zeros written for write-zeroes with NO_HOLE (allocated on first use).
const ZERO_BUFFER_BYTES: usize = 16 << 20;
/// Largest catch-up item (the wire's limit on a note's data).
const ITEM_BYTES_MAX: u64 = crate::replication::wire::NOTE_DATA_MAX as u64;
/// Bytes of items a catch-up source reads ahead of what it has handed out (at least one item).
const SOURCE_READ_AHEAD_BYTES: usize = 64 << 20;
/// Device slots a catch-up source leaves to host IO.
const SOURCE_SLOTS_SPARED: usize = DEVICE_OPS_MAX / 2;
/// Items one poll hands out at most (zero items carry no data: the byte budget does not bound them).
const SOURCE_ITEMS_PER_POLL_MAX: usize = 4096;
/// Write-back: note data written since the last sync that makes the copy sync (it bounds what a
/// power cut can lose, and what recovery checks against data checksums).
const UNSYNCED_DATA_BYTES_MAX: u64 = 256 << 20;
/// Syncs a copy keeps in flight at most. A sync covers only what was written before it was issued,
/// so with one at a time a write that lands just after a sync is issued waits for that sync and then
/// for all of the next one; a second sync, issued while the first runs, takes that wait away. Only
/// a host's wait gets a second one (`host_waits_for_sync`): on a disk with a volatile cache each sync
/// costs a cache flush. Each covers what was written before it was issued, so completions may come in
/// any order (`durable_before` takes the highest).
const SYNCS_IN_FLIGHT_MAX: usize = 2;
/// Spare journal blocks kept beyond a checkpoint's needs.
const JOURNAL_SPARE_BLOCKS: u64 = 8;
/// Largest inline note (see `VolumeCopy::homes`): its data fills at most this many journal slots.
const INLINE_BYTES_MAX: u64 = (INLINE_SLOTS_MAX * JOURNAL_BLOCK_BYTES) as u64;
/// Inline notes' data gathered before it is written home, and the most runs (one write each) a batch
/// gathers: a lone writer's data lands back to back (next-fit allocation), so a batch is usually one
/// large write instead of one small write per note.
const HOME_BATCH_BYTES: usize = 256 << 10;
const HOME_BATCH_RUNS_MAX: usize = 32;
/// A full batch nothing waits for is written in writes of at most this size, one at a time: a lone
/// writer's next note then waits behind one of them at most, not behind the whole batch (on the VM
/// disk, 256 KiB at once: QD1 p99 577 µs; 32 KiB batches: 201 µs, but a 1.18x mean).
const HOME_WRITE_BYTES: u64 = 64 << 10;
/// Home batches a copy holds at most (memory: about 320 KiB each); beyond, writes are not inlined.
const HOME_BATCHES_MAX: usize = 4;

#[derive(Debug, Clone, Copy)]
enum DeviceOp {
    /// Data of the queued entry `entry` (see `Note::entry`).
    NoteData {
        entry: u64,
    },
    JournalBlock {
        seq: u64,
    },
    Sync {
        covers_before: u64,
        /// Home batches written when the sync was issued: durable once it completes.
        homes_through: u64,
    },
    /// A run of home batch `batch` (see `HomeBatch`).
    HomeData {
        batch: u64,
    },
    ReadPiece {
        read: u32,
    },
    /// A read of catch-up source `slot` for its planned item `item`.
    SourceRead {
        slot: u32,
        item: u64,
    },
}

#[derive(Debug, Clone, Copy)]
enum Submission {
    Write {
        address: u64,
        data: *const u8,
        length: usize,
    },
    /// The lead write of a `DataRun`: every write of the run in one vectored write of `length` bytes.
    WriteRun {
        address: u64,
        segments: *const libc::iovec,
        count: usize,
        length: usize,
    },
    Read {
        address: u64,
        data: *mut u8,
        length: usize,
    },
    Sync,
}

/// Note data writes to consecutive device addresses, submitted as one vectored write: at queue depth
/// the allocator places the notes of one iteration back to back (next-fit), so a batch of small writes
/// costs the kernel one IO instead of one each. The first write's tag (the lead) carries the run: its
/// completion completes the riders too, each with the run's outcome (a short or failed vectored write
/// fails every note in it).
#[derive(Debug, Default)]
struct DataRun {
    riders: Vec<u32>,
    /// What the kernel reads until the lead completes: kept here, its heap memory unmoved.
    segments: Vec<libc::iovec>,
}

/// Writes and bytes one vectored data write gathers at most: few enough that a large run does not hold
/// back the acknowledgement of its first note for long.
const DATA_RUN_WRITES_MAX: usize = 64;
const DATA_RUN_BYTES_MAX: usize = 1 << 20;

struct Note {
    /// Position in the queue of entries: consecutive, so that a device completion finds its entry by
    /// subtraction (op numbers cannot serve: a discard reuses them).
    entry: u64,
    op: u64,
    kind: NoteKind,
    /// The host request; taken when it is completed.
    request: Option<IoRequest>,
    pieces: Vec<Piece>,
    data_pending: u32,
    /// Journal seqs of the blocks holding its first and last record.
    first_seq: u64,
    last_seq: u64,
    /// A catch-up note (`NOTE_FLAG_CATCH_UP`): its op may skip ahead, several may share one op.
    catch_up: bool,
    /// The first block whose header records this note's op as committed (`commit_through`); the note
    /// commits only once it is durable. A host or applied note's own block; for a catch-up note,
    /// the block of the first note after its op, `u64::MAX` until there is one (more items of its op
    /// may come, and recovery must never stop in the middle of an op).
    complete_seq: u64,
    failed: bool,
}

/// How an applied request (parked in `waiting`, or being started) gets its op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// A note from the master: the next op.
    Note,
    /// A catch-up item: its own op (see `apply_catch_up`).
    CatchUpItem,
    /// A zero-length catch-up note that completes the open catch-up op and moves the watermark to
    /// its op (see `finish_catch_up`).
    CatchUpEnd,
}

struct SealedBlock {
    seq: u64,
    /// The block's bytes while its write is in flight; empty once written.
    buf: AlignedBuf,
    written: bool,
    /// The `durable_before` in its header.
    vouches_before: u64,
}

/// Inline notes' data on its way to its data-area addresses ("home"): copied here when the note's
/// block is sealed, written in runs of consecutive addresses, and served to reads until written.
struct HomeBatch {
    id: u64,
    buf: AlignedBuf,
    runs: Vec<HomeRun>,
    /// Every byte's write is issued.
    issued: bool,
    /// Where the next write starts: run index, and bytes of that run already issued.
    next_run: usize,
    next_in_run: u64,
    writes_pending: u32,
    /// A write failed: the copy has failed, and the batch stays (reads are served from it).
    failed: bool,
}

/// Consecutive data-area bytes `[address, address + length)`, at `at` in its batch's buffer.
struct HomeRun {
    address: u64,
    length: u64,
    at: usize,
}

impl HomeBatch {
    /// Holds as much as a batch may (`HOME_BATCH_BYTES`, `HOME_BATCH_RUNS_MAX`).
    fn is_full(&self) -> bool {
        self.buf.len() >= HOME_BATCH_BYTES || self.runs.len() >= HOME_BATCH_RUNS_MAX
    }

    /// Still takes inline notes' data: not full, and no write of it issued.
    fn is_gathering(&self) -> bool {
        !self.issued && !self.is_full()
    }
}

impl HomeRun {
    fn end(&self) -> u64 {
        self.address + self.length
    }

    /// Whether it shares a byte with data-area range `[address, address + length)`.
    fn overlaps(&self, address: u64, length: u64) -> bool {
        address < self.end() && self.address < address + length
    }
}

/// The bytes of data-area range `[address, address + length)` while a home batch holds them (not
/// written yet). A committed extent lies inside one note's space, and so inside one run or none.
fn staged_home(homes: &VecDeque<HomeBatch>, address: u64, length: u64) -> Option<&[u8]> {
    for batch in homes {
        for run in &batch.runs {
            if run.overlaps(address, length) {
                debug_assert!(
                    run.address <= address && address + length <= run.end(),
                    "an extent straddles a home run"
                );
                let start = run.at + (address - run.address) as usize;
                return Some(&batch.buf.as_slice()[start..start + length as usize]);
            }
        }
    }
    None
}

struct OpenBlock {
    buf: AlignedBuf,
    kind: BlockKind,
    count: usize,
    checkpoint_id: u64,
}

struct ReadJob {
    request: IoRequest,
    mappings: Vec<Mapping>,
    next: usize,
    pending: u32,
    started_at: u64,
    error: Option<VolumeError>,
}

enum CheckpointPhase {
    Writing { cursor: u64 },
    AwaitDurable { end_seq: u64 },
    AwaitDone { done_seq: u64 },
}

struct CheckpointJob {
    id: u64,
    op: u64,
    snapshot: ExtentMap,
    first_seq: u64,
    replay_from_seq: u64,
    /// Home batches holding data of ops in the checkpoint: durable before the done block is written
    /// (the journal slots of those inline notes are reused after it).
    homes_through: u64,
    count: u64,
    crc: u32,
    /// Extent records scanned from the snapshot and not yet written.
    records: Vec<ExtentRecord>,
    records_written: usize,
    phase: CheckpointPhase,
}

/// A catch-up source: a snapshot and the items planned from it (`start_catch_up_source`).
struct CatchUpSource {
    id: u64,
    snapshot: ExtentMap,
    /// `free_counter` when the snapshot was taken: space freed after it stays in limbo while the
    /// source exists (the snapshot may still read it).
    started_at: u64,
    /// (op, offset, length) of every item, in the order they are sent.
    plan: Vec<(u64, u64, u64)>,
    /// The next planned item to read.
    next: usize,
    /// Items being read or read, in plan order (the front is planned item `next - items.len()`).
    items: VecDeque<SourceItem>,
    /// Bytes of `items`.
    buffered: usize,
    end_sent: bool,
    /// Stopped with reads in flight: kept (buffers, limbo) until they are over.
    stopped: bool,
    failed: Option<VolumeError>,
}

struct SourceItem {
    op: u64,
    offset: u64,
    length: u64,
    /// The range's content; empty when the snapshot holds no data in it (it reads as zeros).
    buf: AlignedBuf,
    pending: u32,
}

impl SourceItem {
    fn data_bytes(&self) -> usize {
        self.buf.len()
    }

    /// A `Zero` item when the whole range reads as zeros, else a `Write` with its content.
    fn into_message(self) -> NoteMessage {
        let zeros = self.buf.as_slice().iter().all(|&byte| byte == 0);
        NoteMessage {
            op: self.op,
            kind: if zeros {
                replication::NoteKind::Zero
            } else {
                replication::NoteKind::Write
            },
            offset: self.offset,
            length: self.length,
            data: if zeros {
                Vec::new()
            } else {
                self.buf.as_slice().to_vec()
            },
        }
    }
}

/// Counters for tests, benchmarks and (later) metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyStats {
    pub committed_op: u64,
    pub next_op: u64,
    pub journal_blocks_written: u64,
    pub syncs: u64,
    pub checkpoints: u64,
    pub data_bytes_written: u64,
    /// Notes created (each took an op number, or shares its catch-up op).
    pub notes_created: u64,
    pub journal_bytes_written: u64,
    pub free_bytes: u64,
    /// Notes written inline: data in the journal with its block, one IO (see `VolumeCopy::homes`).
    pub inline_notes: u64,
    /// Home batches written (each one write per run of consecutive addresses).
    pub home_batches: u64,
    /// Device writes of inline notes' data to their homes (pieces of home batches' runs).
    pub home_writes: u64,
    /// Note data writes pushed to the device (a vectored one counts once), and of those the vectored
    /// ones (`DataRun`: one IO for several writes).
    pub data_writes: u64,
    pub data_runs: u64,
}

pub struct VolumeCopy {
    superblock: Superblock,
    durability: Durability,
    map: ExtentMap,
    allocator: Allocator,
    epoch: u64,
    incarnation: u32,
    /// The watermark this incarnation recovered to: written in every block so that the next recovery
    /// knows that earlier incarnations' notes above it are void (their op numbers are reused).
    resume_op: u64,
    /// The first seq this incarnation writes. Until a durable header vouches for that block no data is
    /// written: recovery may have replayed notes whose blocks no durable header vouches for, after
    /// checking their data checksums, and the space of those a later note overwrote is free now.
    /// Overwriting it before then would make the next recovery fail the checksum and stop there.
    resume_seq: u64,
    /// Blocks before this seq are vouched for by the `durable_before` of a durable block's header.
    /// Data space is reused only once the block vouching for the ops that wrote it is itself vouched
    /// for: damage to any one block is then either detected by recovery (a later durable header
    /// vouches for it) or harmless, never a fall-back to an older state whose data was overwritten.
    vouched_before: u64,
    next_op: u64,
    committed_op: u64,
    next_seq: u64,
    durable_before: u64,
    live_from_seq: u64,
    open: Option<OpenBlock>,
    sealed: VecDeque<SealedBlock>,
    notes: VecDeque<Note>,
    /// Syncs issued and not completed (at most `syncs_in_flight_max`).
    syncs_in_flight: usize,
    /// `SYNCS_IN_FLIGHT_MAX`, or 1 on buffered IO (`one_sync_at_a_time`).
    syncs_in_flight_max: usize,
    /// `covers_before` of the last sync issued: a second sync is issued only for what it does not
    /// cover.
    sync_issued_covers_before: u64,
    /// The first sealed block not written yet (`next_seq` when every sealed block is written): kept
    /// as blocks complete, because write-back keeps thousands of written blocks in `sealed`.
    unwritten_from: u64,
    /// `stats.data_bytes_written` when the last sync was issued.
    data_bytes_at_sync: u64,
    ops: Vec<Option<(DeviceOp, Submission)>>,
    free_tags: Vec<u32>,
    unsubmitted: VecDeque<u32>,
    /// Note data writes of this iteration not pushed yet, at consecutive device addresses up to
    /// `data_run_end` (`issue_data`, `push_data_run`).
    data_run: Vec<u32>,
    data_run_end: u64,
    data_run_bytes: usize,
    /// The run carried by each lead tag in flight, by tag.
    runs: Vec<Option<DataRun>>,
    run_pool: Vec<DataRun>,
    waiting: VecDeque<IoRequest>,
    reads: Vec<Option<ReadJob>>,
    free_reads: Vec<u32>,
    /// Space overwritten by a commit: (free counter, vouching seq, piece). Reusable once no read that
    /// started before the commit is in flight, and once a durable header vouches for journal block
    /// `vouching seq`, whose header says that the blocks of every op that wrote this space are durable:
    /// recovery will not check those ops' data checksums against whatever is written here next.
    limbo: VecDeque<(u64, u64, Piece)>,
    free_counter: u64,
    /// Catch-up sources (slots reused); see `CatchUpSource`.
    sources: Vec<Option<CatchUpSource>>,
    checkpoint: Option<CheckpointJob>,
    checkpoint_id: u64,
    failed: Option<VolumeError>,
    /// Entry number of the next note created (see `Note::entry`).
    next_entry: u64,
    /// Notes with op > this are made durable but not committed (the replication master's limit: what
    /// the slave has committed). `u64::MAX` when unreplicated.
    commit_limit: u64,
    /// Created notes for the replication link, in op order (`set_note_outbox`); `None`: not kept.
    outbox: Option<Vec<NoteMessage>>,
    /// Applied requests parked in `waiting`, in order, with the op each takes when it starts.
    parked: VecDeque<(u64, Applied)>,
    /// The op of the newest note when it is a catch-up item whose op is not complete yet (more items
    /// of that op may follow; see `Note::complete_seq`).
    open_catch_up_op: Option<u64>,
    /// Applied requests so far (wrapping): the `slot` of their origin, which tells the completions
    /// of catch-up items of one op apart (for tests and traces).
    applied_count: u16,
    /// Dropped notes whose data writes are still in flight: their space and buffers are released
    /// when the writes complete.
    discarded: Vec<Note>,
    block_pool: Vec<AlignedBuf>,
    piece_pool: Vec<Vec<Piece>>,
    /// Reused lookup results, so that reads and block status allocate nothing in steady state.
    mapping_pool: Vec<Vec<Mapping>>,
    freed: Vec<Piece>,
    /// Write-back only: space overwritten by a commit whose own note is not durable yet: (free
    /// counter, `durable_before` needed, piece). It moves to `limbo` once that note is durable.
    freed_unsynced: VecDeque<(u64, u64, Piece)>,
    /// Write-back only: FUA writes' acknowledgements waiting for `durable_before` to reach their value,
    /// in op order (so their values never decrease).
    acks_awaiting_sync: VecDeque<(u64, IoCompletion)>,
    /// Write-back only: FLUSH requests waiting for `durable_before` to reach their value.
    flushes: Vec<(u64, IoCompletion)>,
    /// Never written to after allocation: the kernel may read it at any time.
    zeros: AlignedBuf,
    /// Inline notes: a write started while no other note is in flight (a lone writer, QD1) puts its
    /// data in the journal slots after its block and writes both in one IO, instead of a data write
    /// and a block write; it commits once that IO is done (and durable, per the mode) like any other
    /// note. Its data still goes to its data-area address ("home") later, in batches
    /// (`HomeBatch`, oldest first; the last one gathers until `issue_homes`), and reads are served
    /// from the batch until then. Recovery copies home what it replays (`Recovered::home_copies`);
    /// a checkpoint's done block waits until the homes of its ops are durable, since the journal
    /// slots go after it; space under an unwritten home is not reused (`release_limbo`).
    homes: VecDeque<HomeBatch>,
    home_pool: Vec<AlignedBuf>,
    next_home_batch: u64,
    /// Every home batch with an id up to this is written, resp. durable.
    homes_written_through: u64,
    homes_durable_through: u64,
    /// `release_limbo` stopped at space under a home batch not issued yet.
    limbo_waits_for_home: bool,
    /// The last notes block sealed held one note: writes come one at a time (see `inline_slots`).
    lone_writer: bool,
    stats: CopyStats,
}

// SAFETY: the raw pointers in `ops` point into buffers this copy owns (note requests, sealed journal
// blocks, read jobs); moving the copy to another thread moves their owner with them, and the copy is only
// ever used by one thread at a time (its reactor).
unsafe impl Send for VolumeCopy {}

impl VolumeCopy {
    /// The runtime state after recovery: `allocator` must already hold the map's live data.
    pub fn new(
        superblock: Superblock,
        recovered: Recovered,
        allocator: Allocator,
        durability: Durability,
    ) -> VolumeCopy {
        VolumeCopy {
            superblock,
            durability,
            map: recovered.map,
            allocator,
            epoch: 0,
            incarnation: recovered.incarnation,
            resume_op: recovered.committed_op,
            resume_seq: recovered.next_seq,
            vouched_before: 0,
            next_op: recovered.committed_op + 1,
            committed_op: recovered.committed_op,
            next_seq: recovered.next_seq,
            durable_before: recovered.next_seq,
            live_from_seq: recovered.live_from_seq,
            open: None,
            sealed: VecDeque::new(),
            notes: VecDeque::with_capacity(256),
            syncs_in_flight: 0,
            syncs_in_flight_max: SYNCS_IN_FLIGHT_MAX,
            sync_issued_covers_before: 0,
            unwritten_from: recovered.next_seq,
            data_bytes_at_sync: 0,
            ops: (0..DEVICE_OPS_MAX).map(|_| None).collect(),
            free_tags: (0..DEVICE_OPS_MAX as u32).rev().collect(),
            unsubmitted: VecDeque::with_capacity(DEVICE_OPS_MAX),
            data_run: Vec::with_capacity(DATA_RUN_WRITES_MAX),
            data_run_end: 0,
            data_run_bytes: 0,
            runs: (0..DEVICE_OPS_MAX).map(|_| None).collect(),
            run_pool: Vec::new(),
            waiting: VecDeque::new(),
            reads: Vec::new(),
            free_reads: Vec::new(),
            limbo: VecDeque::new(),
            free_counter: 0,
            sources: Vec::new(),
            checkpoint: None,
            checkpoint_id: recovered.checkpoint_id,
            failed: None,
            next_entry: 0,
            commit_limit: u64::MAX,
            outbox: None,
            parked: VecDeque::new(),
            open_catch_up_op: None,
            applied_count: 0,
            discarded: Vec::new(),
            block_pool: Vec::new(),
            piece_pool: Vec::new(),
            mapping_pool: Vec::new(),
            freed: Vec::new(),
            freed_unsynced: VecDeque::new(),
            acks_awaiting_sync: VecDeque::new(),
            flushes: Vec::new(),
            zeros: AlignedBuf::empty(),
            homes: VecDeque::new(),
            home_pool: Vec::new(),
            next_home_batch: 1,
            homes_written_through: 0,
            homes_durable_through: 0,
            limbo_waits_for_home: false,
            lone_writer: false,
            stats: CopyStats::default(),
        }
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn stats(&self) -> CopyStats {
        CopyStats {
            committed_op: self.committed_op,
            next_op: self.next_op,
            free_bytes: self.allocator.free_bytes(),
            ..self.stats
        }
    }

    /// Keeps at most one sync in flight: for a store on buffered IO (the file system refused
    /// O_DIRECT). There a page's write-back error is reported to one fdatasync of the file only, so
    /// with two in flight the error could reach the later one while the earlier one succeeds and
    /// vouches for the failed page.
    pub fn one_sync_at_a_time(&mut self) {
        self.syncs_in_flight_max = 1;
    }

    /// Device operations and host requests not finished yet.
    pub fn in_flight(&self) -> usize {
        DEVICE_OPS_MAX - self.free_tags.len()
            + self.waiting.len()
            + self.notes.len()
            + self.discarded.len()
            + self.acks_awaiting_sync.len()
            + self.flushes.len()
    }

    /// Nothing of this copy is with the device or waiting for it: no device operation queued or
    /// submitted, no host request, note or read job in progress. `reset` needs it: the kernel must
    /// hold no buffer of the state it drops, and no completion may reach the state that replaces it.
    pub fn is_idle(&self) -> bool {
        self.in_flight() == 0
            && self.unsubmitted.is_empty()
            && self.parked.is_empty()
            && self.syncs_in_flight == 0
            && self.reads.iter().all(Option::is_none)
    }

    /// Reprovisioning in place: this copy becomes an empty copy of the same volume (committed op 0,
    /// empty map, all data space free, a fresh journal) for a store whose superblock is now
    /// `superblock`: the same layout under a new volume id, which the caller has made durable
    /// (`volume::open::reset_copy`). Recovery ignores journal blocks of another volume id, so nothing
    /// written before can be replayed into the new state. Keeps what the replication peer set (commit
    /// limit, note outbox), the durability mode, a device failure (it lasts until a restart) and the
    /// counters.
    pub fn reset(&mut self, superblock: Superblock) {
        assert!(self.is_idle(), "a copy is reset only when idle");
        assert_ne!(
            superblock.volume_id, self.superblock.volume_id,
            "a reset copy needs a new volume id, or the old journal would replay"
        );
        assert_eq!(
            Superblock {
                volume_id: self.superblock.volume_id,
                ..superblock.clone()
            },
            self.superblock,
            "a reset keeps the volume's name, size and layout"
        );
        let data_bytes = superblock.data_bytes;
        let mut fresh = VolumeCopy::new(
            superblock,
            Recovered::empty(),
            Allocator::new(data_bytes),
            self.durability,
        );
        fresh.commit_limit = self.commit_limit;
        fresh.outbox = self.outbox.as_ref().map(|_| Vec::new());
        fresh.failed = self.failed;
        fresh.stats = self.stats;
        *self = fresh;
    }

    /// The commit watermark: every op up to it is committed (readable, and durable).
    pub fn committed_op(&self) -> u64 {
        self.committed_op
    }

    /// Returning peer: the ranges of every committed extent written by an op after `op` (trims and
    /// write-zeroes included), in offset order, adjacent ranges merged.
    pub fn changed_since(&self, op: u64) -> Vec<replication::ByteRange> {
        let mut extents = Vec::new();
        self.map.changed_since(op, &mut extents);
        let mut ranges: Vec<replication::ByteRange> = Vec::with_capacity(extents.len());
        for extent in extents {
            match ranges.last_mut() {
                Some(last) if last.offset + last.length == extent.offset => {
                    last.length += extent.length
                }
                _ => ranges.push(replication::ByteRange {
                    offset: extent.offset,
                    length: extent.length,
                }),
            }
        }
        ranges
    }

    /// The op number the next note gets (for `apply_note`: the op it must carry).
    pub fn next_op(&self) -> u64 {
        self.parked.back().map_or(self.next_op, |&(op, _)| op + 1)
    }

    /// The catch-up op a further item may still carry (the newest accepted item's, unless a later
    /// note or a finish completed it, or the item was refused by a failed copy).
    pub fn catch_up_op_open(&self) -> Option<u64> {
        match self.parked.back() {
            Some(&(op, Applied::CatchUpItem)) => Some(op),
            Some(_) => None,
            None => self.open_catch_up_op,
        }
    }

    /// Replication master: notes with op > `through` are made durable as usual but not committed
    /// (not readable, not acknowledged) until the limit is raised; raising it commits what is durable,
    /// in op order, now. A limit below the watermark means the watermark (what is committed stays so).
    /// Recovery ignores the limit: it replays every durable note (see `commit_through`).
    pub fn set_commit_limit(
        &mut self,
        through: u64,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        let raised = through > self.commit_limit;
        self.commit_limit = through;
        if raised {
            self.advance(device, done);
        }
    }

    /// Replication master: keep (`true`) a copy of every note created from now on, writes with their
    /// data, for `take_created_notes`; `false` drops what is kept and stops copying.
    pub fn set_note_outbox(&mut self, enabled: bool) {
        self.outbox = enabled.then(Vec::new);
    }

    /// Moves the notes created since the last call (in op order) to `out`.
    pub fn take_created_notes(&mut self, out: &mut Vec<NoteMessage>) {
        if let Some(outbox) = self.outbox.as_mut() {
            out.append(outbox);
        }
    }

    /// Replication slave: writes a note received from the master, with its op number, which must be
    /// the copy's next one (`next_op`). It goes the way of a host write (data space, journal record,
    /// group commit) and commits as soon as it is durable (and within the commit limit); its
    /// completion carries `Origin::REPLICATION`. A note the copy cannot take (out of order, out of
    /// range, inconsistent) is refused with an error and changes nothing.
    pub fn apply_note(
        &mut self,
        note: NoteMessage,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) -> Result<(), ApplyError> {
        let expected = self.next_op();
        if note.op != expected {
            return Err(ApplyError::OutOfOrder {
                expected,
                got: note.op,
            });
        }
        let request = self.replication_request(&note)?;
        self.end_open_catch_up_op(device, done);
        self.start_applied(request, note.op, Applied::Note, device, done);
        Ok(())
    }

    /// Before a note of a later op: a zero-length note that completes the open catch-up op, so that
    /// it commits (and frees what it overwrote) without waiting for the later note to get data space.
    fn end_open_catch_up_op(&mut self, device: &mut dyn Device, done: &mut VecDeque<IoCompletion>) {
        if let Some(open) = self.catch_up_op_open() {
            self.start_applied(
                Self::jump_request(open),
                open,
                Applied::CatchUpEnd,
                device,
                done,
            );
        }
    }

    /// The request of a zero-length catch-up note with op `op`.
    fn jump_request(op: u64) -> IoRequest {
        IoRequest {
            volume: 0,
            kind: IoKind::Trim,
            flags: IoFlags::empty(),
            offset: 0,
            length: 0,
            buf: AlignedBuf::empty(),
            origin: Origin::replication(op),
        }
    }

    /// Returning peer: writes a catch-up item (`replication::message::CatchUpItem::Extent`) as a note
    /// with its own op, which must be at least `next_op()` (the ops in between are not part of the
    /// catch-up: the op sequence jumps) or the op of the previous item (an op whose range was sent
    /// as several items: each is a note of that op). It commits like any note (durable, in op order,
    /// within the commit limit), but an op only as a whole, once a later note is durable too: a
    /// zero-length note of its op, which an item of a later op, an `apply_note` or a finish writes
    /// first (one 64-byte journal record per op), so that no recovery stops in the middle of an op.
    /// Every item of one op must fit the free data space at once (what they overwrite is freed when
    /// the op commits): true of a source's items (an op spans at most its request, ≤ 32 MiB of
    /// data). A host write while an op is open completes it too, once it starts (a catching-up peer
    /// takes none). Refused, changing nothing, if out of order, out of range or inconsistent.
    pub fn apply_catch_up(
        &mut self,
        item: NoteMessage,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) -> Result<(), ApplyError> {
        let expected = self.next_op();
        if item.op < expected && self.catch_up_op_open() != Some(item.op) {
            return Err(ApplyError::OutOfOrder {
                expected,
                got: item.op,
            });
        }
        let request = self.replication_request(&item)?;
        if self.catch_up_op_open().is_some_and(|open| item.op > open) {
            self.end_open_catch_up_op(device, done);
        }
        self.start_applied(request, item.op, Applied::CatchUpItem, device, done);
        Ok(())
    }

    /// Returning peer: every catch-up item through `through` was applied. If `through` is at least
    /// `next_op()`, a zero-length catch-up note with op `through` (no data, no extent) moves the
    /// watermark to `through` once durable; if an item's op is still open (`through` is its op), a
    /// zero-length note of that op completes it. Otherwise nothing. `apply_note` then continues with
    /// `next_op()` (`through + 1` after a jump).
    pub fn finish_catch_up(
        &mut self,
        through: u64,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        let op = if through >= self.next_op() {
            through
        } else if let Some(open) = self.catch_up_op_open() {
            if open != through {
                tracing::warn!(
                    through,
                    open,
                    "catch-up finished below the op of its last item: completing that op"
                );
            }
            open
        } else {
            return;
        };
        self.start_applied(
            Self::jump_request(op),
            op,
            Applied::CatchUpEnd,
            device,
            done,
        );
    }

    /// Starts an applied request with op `op`, or parks it behind what waits (`start` takes the op
    /// from `parked`).
    fn start_applied(
        &mut self,
        mut request: IoRequest,
        op: u64,
        applied: Applied,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        request.origin.slot = self.applied_count;
        self.applied_count = self.applied_count.wrapping_add(1);
        self.parked.push_back((op, applied));
        if self.waiting.is_empty() {
            if let Err(request) = self.start(request, device, done) {
                self.waiting.push_back(request);
            }
        } else {
            self.waiting.push_back(request);
        }
    }

    /// Catch-up source (master): takes an O(1) snapshot of the committed map at the watermark `K`
    /// (returned) and plans the items that bring a copy holding every op up to `base` to exactly
    /// that snapshot: for each op after `base` that the snapshot still holds, in ascending op order,
    /// one item covering its extents from the lowest offset to the highest end, with the snapshot's
    /// content of that whole range (a later op's data in between is sent again by that op's item).
    /// An op whose range exceeds `NOTE_DATA_MAX` is sent as one item per extent instead (extents
    /// above it in chunks), all with its op. While the source runs, space its snapshot refers to is
    /// not reused (`limbo`). Several sources may run at once; an `id` already running is replaced.
    pub fn start_catch_up_source(&mut self, id: u64, base: u64) -> u64 {
        self.stop_catch_up_source(id);
        let snapshot = self.map.snapshot();
        let mut extents = Vec::new();
        snapshot.changed_since(base, &mut extents);
        extents.sort_unstable_by_key(|extent| (extent.op, extent.offset));
        let mut plan = Vec::new();
        for group in extents.chunk_by(|a, b| a.op == b.op) {
            let low = group[0].offset;
            let high = group
                .iter()
                .map(Extent::end)
                .max()
                .expect("a group is not empty");
            if high - low <= ITEM_BYTES_MAX {
                plan.push((group[0].op, low, high - low));
                continue;
            }
            for extent in group {
                let mut offset = extent.offset;
                while offset < extent.end() {
                    let length = (extent.end() - offset).min(ITEM_BYTES_MAX);
                    plan.push((extent.op, offset, length));
                    offset += length;
                }
            }
        }
        tracing::info!(
            id,
            base,
            through = self.committed_op,
            items = plan.len(),
            "catch-up source started"
        );
        let source = CatchUpSource {
            id,
            snapshot,
            started_at: self.free_counter,
            plan,
            next: 0,
            items: VecDeque::new(),
            buffered: 0,
            end_sent: false,
            stopped: false,
            failed: None,
        };
        match self.sources.iter().position(Option::is_none) {
            Some(slot) => self.sources[slot] = Some(source),
            None => self.sources.push(Some(source)),
        }
        self.committed_op
    }

    /// Called once per reactor iteration for a running source: appends to `out`, in ascending op
    /// order, the items whose reads have completed (about `budget_bytes` of data at most, but at
    /// least one), then `CatchUpItem::End` once after the last; and starts reading ahead (reads go
    /// through the device like host reads, bounded in bytes and device slots). A read error stops the
    /// source: nothing more is produced (`catch_up_source_error`).
    pub fn poll_catch_up_source(
        &mut self,
        id: u64,
        out: &mut Vec<replication::CatchUpItem>,
        budget_bytes: usize,
        device: &mut dyn Device,
        _done: &mut VecDeque<IoCompletion>,
    ) {
        let Some(slot) = self.source_slot(id) else {
            return;
        };
        let source = self.sources[slot].as_mut().expect("live source");
        let mut emitted = 0usize;
        let mut count = 0usize;
        while let Some(item) = source.items.front() {
            if item.pending > 0
                || source.failed.is_some()
                || count >= SOURCE_ITEMS_PER_POLL_MAX
                || (count > 0 && emitted + item.data_bytes() > budget_bytes)
            {
                break;
            }
            let item = source.items.pop_front().expect("front exists");
            source.buffered -= item.length as usize;
            emitted += item.data_bytes();
            count += 1;
            out.push(replication::CatchUpItem::Extent(item.into_message()));
        }
        if let Some(error) = source.failed {
            if !source.end_sent {
                tracing::error!(id, %error, "catch-up source failed: a read of the snapshot failed");
                source.end_sent = true; // logged once; nothing more is produced
            }
            return;
        }
        if source.next == source.plan.len() && source.items.is_empty() && !source.end_sent {
            out.push(replication::CatchUpItem::End);
            // Done: nothing in flight; the snapshot and the space it held are released now.
            self.sources[slot] = None;
            self.release_limbo();
            return;
        }
        self.read_ahead(slot, device);
    }

    /// The error that stopped a source, if any.
    pub fn catch_up_source_error(&self, id: u64) -> Option<VolumeError> {
        self.source_slot(id)
            .and_then(|slot| self.sources[slot].as_ref())
            .and_then(|source| source.failed)
    }

    /// Ends a source (finished or not): its snapshot is released once its reads in flight are over,
    /// and with it the space only the snapshot still referred to.
    pub fn stop_catch_up_source(&mut self, id: u64) {
        let Some(slot) = self.source_slot(id) else {
            return;
        };
        let source = self.sources[slot].as_mut().expect("live source");
        source.stopped = true;
        source.plan = Vec::new();
        if source.items.iter().all(|item| item.pending == 0) {
            self.sources[slot] = None;
        }
        self.release_limbo();
    }

    fn source_slot(&self, id: u64) -> Option<usize> {
        self.sources.iter().position(|source| {
            source
                .as_ref()
                .is_some_and(|source| source.id == id && !source.stopped)
        })
    }

    /// Starts the reads of the next planned items while the source's read-ahead and the device
    /// slots spared for host IO allow.
    fn read_ahead(&mut self, slot: usize, device: &mut dyn Device) {
        let mut mappings = Vec::new();
        loop {
            let source = self.sources[slot].as_mut().expect("live source");
            let Some(&(op, offset, length)) = source.plan.get(source.next) else {
                return;
            };
            if source.buffered > 0 && source.buffered + length as usize > SOURCE_READ_AHEAD_BYTES {
                return;
            }
            mappings.clear();
            source.snapshot.lookup(offset, length, &mut mappings);
            mappings.retain(|mapping| {
                matches!(
                    mapping,
                    Mapping::Mapped(Extent {
                        location: Location::Data(_),
                        ..
                    })
                )
            });
            if self.free_tags.len() < SOURCE_SLOTS_SPARED + mappings.len() {
                return; // resumed on a later poll
            }
            let mut item = SourceItem {
                op,
                offset,
                length,
                buf: AlignedBuf::empty(),
                pending: 0,
            };
            if !mappings.is_empty() {
                // Holes and zero extents read as the zeros the buffer starts with.
                item.buf = AlignedBuf::with_capacity(length as usize);
                item.buf.set_len(length as usize);
                item.buf.as_mut_slice().fill(0);
            }
            let plan_index = source.next as u64;
            source.next += 1;
            source.buffered += length as usize;
            source.items.push_back(item);
            let item = source.items.back_mut().expect("just pushed");
            let mut reads = Vec::with_capacity(mappings.len());
            for mapping in &mappings {
                let Mapping::Mapped(Extent {
                    offset: piece_offset,
                    length: piece_length,
                    location: Location::Data(address),
                    ..
                }) = *mapping
                else {
                    unreachable!("only data mappings are kept");
                };
                let start = (piece_offset - offset) as usize;
                let target = &mut item.buf.as_mut_slice()[start..start + piece_length as usize];
                if let Some(staged) = staged_home(&self.homes, address, piece_length) {
                    target.copy_from_slice(staged);
                    continue;
                }
                let data = target.as_mut_ptr();
                item.pending += 1;
                reads.push(Submission::Read {
                    address: self.superblock.data_offset + address,
                    data,
                    length: piece_length as usize,
                });
            }
            for submission in reads {
                self.issue(
                    DeviceOp::SourceRead {
                        slot: slot as u32,
                        item: plan_index,
                    },
                    submission,
                    device,
                );
            }
        }
    }

    /// The request that writes a note (or catch-up extent) received from a peer, after checking it.
    fn replication_request(&self, note: &NoteMessage) -> Result<IoRequest, ApplyError> {
        let aligned = note.offset.is_multiple_of(512) && note.length.is_multiple_of(512);
        let in_volume = note
            .offset
            .checked_add(note.length)
            .is_some_and(|end| end <= self.superblock.volume_size);
        if note.length == 0 || !aligned || !in_volume || note.length > u64::from(u32::MAX) {
            return Err(ApplyError::Range {
                offset: note.offset,
                length: note.length,
            });
        }
        let kind = match note.kind {
            replication::NoteKind::Write => IoKind::Write,
            replication::NoteKind::Trim => IoKind::Trim,
            replication::NoteKind::Zero => IoKind::WriteZeroes,
        };
        let expected_data = if kind == IoKind::Write {
            note.length as usize
        } else {
            0
        };
        if note.data.len() != expected_data {
            return Err(ApplyError::DataLength {
                expected: expected_data,
                got: note.data.len(),
            });
        }
        let mut buf = AlignedBuf::empty();
        if kind == IoKind::Write {
            buf = AlignedBuf::with_capacity(note.data.len());
            buf.set_len(note.data.len());
            buf.as_mut_slice().copy_from_slice(&note.data);
        }
        Ok(IoRequest {
            volume: 0,
            kind,
            flags: IoFlags::empty(),
            offset: note.offset,
            length: note.length as u32,
            buf,
            origin: Origin::replication(note.op),
        })
    }

    /// Drops every note above the commit watermark: their requests fail with `VolumeError::Fenced`
    /// (host writes) and parked write-like requests too; their space is freed once their in-flight
    /// data writes have completed (they cannot be cancelled) and the discard is durable; the next op
    /// becomes `committed + 1`.
    ///
    /// Durability: the journal continues in a new incarnation that resumes from the watermark, so that
    /// recovery treats the dropped notes as void (their op numbers are reused) once a block of the new
    /// incarnation is durable. A power cut before that may bring the dropped notes back (recovery
    /// replays every durable note); the protocol treats them as part of an older history and repairs
    /// them. Their space is not reused before then, so what such a recovery brings back is their data.
    pub fn discard_uncommitted(
        &mut self,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for request in self.waiting.drain(..) {
            if matches!(
                request.kind,
                IoKind::Write | IoKind::Trim | IoKind::WriteZeroes
            ) {
                done.push_back(IoCompletion {
                    origin: request.origin,
                    result: Err(VolumeError::Fenced),
                    buf: request.buf,
                });
            } else {
                kept.push_back(request);
            }
        }
        self.waiting = kept;
        self.parked.clear();
        // An open catch-up op is uncommitted (it commits only once complete): dropped below.
        self.open_catch_up_op = None;
        let dropped = self.notes.len();
        while let Some(note) = self.notes.pop_front() {
            debug_assert!(note.op > self.committed_op);
            if note.data_pending == 0 {
                self.release_discarded(note, done);
            } else {
                self.discarded.push(note);
            }
        }
        // Every record in the open block belongs to a note just dropped: the block is never written.
        if let Some(open) = self.open.take() {
            debug_assert_eq!(open.kind, BlockKind::Notes);
            self.block_pool.push(open.buf);
        }
        if let Some(outbox) = self.outbox.as_mut() {
            let committed = self.committed_op;
            outbox.retain(|note| note.op <= committed);
        }
        if dropped > 0 || self.next_op != self.committed_op + 1 {
            tracing::info!(
                dropped,
                committed_op = self.committed_op,
                next_op = self.next_op,
                "uncommitted notes discarded"
            );
            self.incarnation += 1;
            self.resume_op = self.committed_op;
            self.next_op = self.committed_op + 1;
        }
        self.advance(device, done);
    }

    /// A dropped note whose data writes are over: its request fails, its space goes to limbo until a
    /// block of the incarnation that voids it is durable and vouched for (see `discard_uncommitted`).
    fn release_discarded(&mut self, mut note: Note, done: &mut VecDeque<IoCompletion>) {
        debug_assert_eq!(note.data_pending, 0);
        if !note.pieces.is_empty() {
            self.free_counter += 1;
            let vouching_seq = self.next_seq;
            for piece in note.pieces.drain(..) {
                self.limbo
                    .push_back((self.free_counter, vouching_seq, piece));
            }
        }
        self.piece_pool.push(note.pieces);
        if let Some(request) = note.request.take() {
            done.push_back(IoCompletion {
                origin: request.origin,
                result: Err(VolumeError::Fenced),
                buf: request.buf,
            });
        }
    }

    /// Starts (or parks) a host request.
    pub fn submit(
        &mut self,
        request: IoRequest,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        if !self.waiting.is_empty() {
            self.waiting.push_back(request);
            return;
        }
        if let Err(request) = self.start(request, device, done) {
            self.waiting.push_back(request);
        }
    }

    /// Starts a request, or gives it back when resources (device slots, data or journal space) are
    /// short for now.
    fn start(
        &mut self,
        mut request: IoRequest,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) -> Result<(), IoRequest> {
        match request.kind {
            IoKind::Read => return self.start_read(request, device, done),
            IoKind::Write | IoKind::Trim | IoKind::WriteZeroes => {}
            IoKind::Flush
                if self.durability == Durability::WriteBack
                    && self.failed.is_none()
                    && self.durable_before < self.next_seq =>
            {
                // Every acknowledged write's note is in a sealed block (it was written): the flush
                // is done once every sealed block is durable, with the data of its notes.
                let completion = IoCompletion {
                    origin: request.origin,
                    result: Ok(0),
                    buf: request.buf,
                };
                // `end_iteration` issues the sync (`sync_wanted`).
                self.flushes.push((self.next_seq, completion));
                return Ok(());
            }
            IoKind::Flush | IoKind::Cache => {
                // Every acknowledged write is already durable (write-back: nothing unsynced): nothing
                // to wait for.
                let result = match self.failed {
                    Some(error) if request.kind == IoKind::Flush => Err(error),
                    _ => Ok(0),
                };
                done.push_back(IoCompletion {
                    origin: request.origin,
                    result,
                    buf: request.buf,
                });
                return Ok(());
            }
            IoKind::BlockStatus => {
                let count = self.block_status(&mut request);
                done.push_back(IoCompletion {
                    origin: request.origin,
                    result: Ok(count),
                    buf: request.buf,
                });
                return Ok(());
            }
        }
        if let Some(error) = self.failed {
            if request.origin.is_replication() {
                self.parked.pop_front();
            }
            done.push_back(IoCompletion {
                origin: request.origin,
                result: Err(error),
                buf: request.buf,
            });
            return Ok(());
        }
        // Write-zeroes with NO_HOLE must leave the range allocated: it is written as zeros. Trims and
        // plain write-zeroes become zero extents, which cost no data space.
        let zero_data =
            request.kind == IoKind::WriteZeroes && request.flags.contains(IoFlags::NO_HOLE);
        let kind = if request.kind == IoKind::Write || zero_data {
            NoteKind::Write
        } else {
            NoteKind::Zero
        };
        if zero_data && self.zeros.is_empty() {
            self.zeros = AlignedBuf::with_capacity(ZERO_BUFFER_BYTES);
            self.zeros.set_len(ZERO_BUFFER_BYTES);
        }
        if kind == NoteKind::Write && self.vouched_before <= self.resume_seq {
            return Err(request); // see `resume_seq`; `write_vouching_block` gets it written
        }
        let mut pieces = self.piece_pool.pop().unwrap_or_default();
        pieces.clear();
        if kind == NoteKind::Write
            && self
                .allocator
                .allocate(u64::from(request.length), &mut pieces)
                .is_err()
        {
            self.piece_pool.push(pieces);
            if self.notes.is_empty()
                && self.limbo.is_empty()
                && self.freed_unsynced.is_empty()
                && self.discarded.is_empty()
            {
                if request.origin.is_replication() {
                    self.parked.pop_front();
                }
                done.push_back(IoCompletion {
                    origin: request.origin,
                    result: Err(VolumeError::NoSpace),
                    buf: request.buf,
                });
                return Ok(());
            }
            return Err(request); // commits in flight will free space
        }
        let records = pieces.len().max(1);
        let blocks_needed = records.div_ceil(NOTES_PER_BLOCK) as u64 + 1;
        let data_writes: usize = if zero_data {
            pieces
                .iter()
                .map(|piece| (piece.length as usize).div_ceil(ZERO_BUFFER_BYTES))
                .sum()
        } else {
            pieces.len()
        };
        if self.free_tags.len() < data_writes + blocks_needed as usize + 1
            || !self.journal_has_room(blocks_needed)
        {
            for piece in pieces.drain(..) {
                self.allocator.free(piece);
            }
            self.piece_pool.push(pieces);
            return Err(request);
        }
        // The commit will insert this range into the map: have its leaf in cache by then.
        self.map.prefetch(request.offset);
        let (op, applied) = if request.origin.is_replication() {
            self.parked
                .pop_front()
                .expect("an applied request is parked")
        } else {
            (self.next_op, Applied::Note)
        };
        let catch_up = applied != Applied::Note;
        debug_assert!(
            op == self.next_op
                || catch_up && op > self.next_op
                || catch_up && self.open_catch_up_op == Some(op),
            "op {op} ({applied:?}) out of order: next op {}",
            self.next_op
        );
        self.next_op = op + 1;
        self.stats.notes_created += 1;
        if self.outbox.is_some() {
            self.note_created(op, &request);
        }
        let entry = self.next_entry;
        self.next_entry += 1;
        let inline_slots = if catch_up {
            None // catch-up items share ops and blocks: never inline
        } else {
            self.inline_slots(&request, &pieces, zero_data, blocks_needed)
        };
        let first_seq = self.open_block_seq(BlockKind::Notes);
        if let Some(open) = self.open_catch_up_op
            && (op > open || applied == Applied::CatchUpEnd)
        {
            // This note's block is the first to record the open op as committed.
            self.complete_catch_up_op(open, first_seq);
        }
        let mut note = Note {
            entry,
            op,
            kind,
            request: None,
            pieces,
            data_pending: 0,
            first_seq,
            last_seq: first_seq,
            catch_up,
            complete_seq: if applied == Applied::CatchUpItem {
                u64::MAX
            } else {
                first_seq
            },
            failed: false,
        };
        if applied == Applied::CatchUpItem {
            self.open_catch_up_op = Some(op);
        }
        let piece_count = note.pieces.len().max(1) as u16;
        if kind == NoteKind::Write {
            let mut position = 0usize;
            for index in 0..note.pieces.len() {
                let piece = note.pieces[index];
                let length = piece.length as usize;
                let data_crc = if zero_data {
                    let mut crc = 0;
                    let mut left = length;
                    while left > 0 {
                        let chunk = left.min(ZERO_BUFFER_BYTES);
                        crc = crc32c::crc32c_append(crc, &self.zeros.as_slice()[..chunk]);
                        left -= chunk;
                    }
                    crc
                } else {
                    crc32c::crc32c(&request.buf.as_slice()[position..position + length])
                };
                let record = NoteRecord {
                    op,
                    epoch: self.epoch,
                    offset: request.offset + position as u64,
                    length: piece.length,
                    location: piece.address,
                    data_crc,
                    kind,
                    piece_index: index as u16,
                    piece_count,
                    catch_up,
                };
                note.last_seq = self.append_note(&record, device);
                if let Some(slots) = inline_slots {
                    // Block and data in one write; the data goes home later (`homes`).
                    let data = &request.buf.as_slice()[..length];
                    self.seal_with_data(Some(data), device);
                    self.stage_home(piece.address, data);
                    note.last_seq += slots;
                    self.stats.inline_notes += 1;
                    break;
                }
                // Zeros come from the shared zero buffer, in chunks of its size.
                let mut written = 0usize;
                while written < length {
                    let chunk = if zero_data {
                        (length - written).min(ZERO_BUFFER_BYTES)
                    } else {
                        length
                    };
                    let data = if zero_data {
                        self.zeros.as_slice().as_ptr()
                    } else {
                        request.buf.as_slice()[position..].as_ptr()
                    };
                    let address = self.superblock.data_offset + piece.address + written as u64;
                    self.issue_data(entry, address, data, chunk, device);
                    note.data_pending += 1;
                    written += chunk;
                }
                self.stats.data_bytes_written += piece.length;
                position += length;
            }
        } else {
            let record = NoteRecord {
                op,
                epoch: self.epoch,
                offset: request.offset,
                length: u64::from(request.length),
                location: LOCATION_ZERO,
                data_crc: 0,
                kind,
                piece_index: 0,
                piece_count: 1,
                catch_up,
            };
            note.last_seq = self.append_note(&record, device);
        }
        // The request buffer moves into the note; the data writes above point into its heap memory,
        // which does not move with it.
        note.request = Some(request);
        self.notes.push_back(note);
        Ok(())
    }

    /// Journal slots for the data of this write as an inline note (`homes`), or `None`: it must be a
    /// write (from the host, or a note applied from the replication master) of one piece of at most `INLINE_BYTES_MAX`, started while no other note is in
    /// flight and after a block that held one note (a lone writer; where writes come several at a
    /// time, a block batches them and inlining one would only cost journal room: more checkpoints,
    /// measured 0.85x IOPS at QD32), its home must start a home batch or continue the gathering
    /// one, and its slots must fit before the ring's end and in the room the journal has.
    fn inline_slots(
        &self,
        request: &IoRequest,
        pieces: &[crate::alloc::Piece],
        zero_data: bool,
        blocks_needed: u64,
    ) -> Option<u64> {
        let lone = self.lone_writer
            && self.notes.is_empty()
            && self.open.is_none()
            && self.open_catch_up_op.is_none();
        let room = self.homes.len() < HOME_BATCHES_MAX
            || self.homes.back().is_some_and(HomeBatch::is_gathering);
        // A home that neither starts a batch nor continues its last run (free space in single
        // blocks, as on a store overwritten at random) would be one more small write later, on the
        // device's time of the writer's next note: the data goes there now instead, beside the
        // note's block, as two writes in flight at once.
        let contiguous = match self.homes.back() {
            Some(batch) if batch.is_gathering() => batch.runs.last().is_none_or(|run| {
                pieces
                    .first()
                    .is_some_and(|piece| piece.address == run.end())
            }),
            _ => true,
        };
        if !lone
            || !room
            || !contiguous
            || request.kind != IoKind::Write
            || zero_data
            || pieces.len() != 1
            || u64::from(request.length) > INLINE_BYTES_MAX
        {
            return None;
        }
        let slots = u64::from(request.length).div_ceil(JOURNAL_BLOCK_BYTES as u64);
        let slot = self.next_seq % self.superblock.journal_blocks();
        (slot + slots < self.superblock.journal_blocks()
            && self.journal_has_room(blocks_needed + slots))
        .then_some(slots)
    }

    /// Copies an inline note's data into the gathering home batch (`homes`).
    fn stage_home(&mut self, address: u64, data: &[u8]) {
        let gathering = self.homes.back().is_some_and(HomeBatch::is_gathering);
        if !gathering {
            let mut buf = self.home_pool.pop().unwrap_or_else(|| {
                AlignedBuf::with_capacity(HOME_BATCH_BYTES + INLINE_BYTES_MAX as usize)
            });
            buf.set_len(0);
            self.homes.push_back(HomeBatch {
                id: self.next_home_batch,
                buf,
                runs: Vec::new(),
                issued: false,
                next_run: 0,
                next_in_run: 0,
                writes_pending: 0,
                failed: false,
            });
            self.next_home_batch += 1;
        }
        let batch = self.homes.back_mut().expect("a gathering batch");
        let at = batch.buf.len();
        batch.buf.set_len(at + data.len());
        batch.buf.as_mut_slice()[at..].copy_from_slice(data);
        let length = data.len() as u64;
        match batch.runs.last_mut() {
            Some(run) if run.end() == address => run.length += length,
            _ => batch.runs.push(HomeRun {
                address,
                length,
                at,
            }),
        }
    }

    /// Writes home batches, oldest first. A full batch is written in `HOME_WRITE_BYTES` pieces, one
    /// in flight at a time; everything at once when something waits for it: a checkpoint, space
    /// under it (`limbo_waits_for_home`), or parked requests (which may wait for that space). The
    /// gathering batch is written only then.
    fn issue_homes(&mut self, device: &mut dyn Device) {
        if self.failed.is_some() {
            return;
        }
        let Some(first) = self.homes.iter().position(|batch| !batch.issued) else {
            return;
        };
        for index in first..self.homes.len() {
            let batch = &self.homes[index];
            let full = batch.is_full();
            let urgent = self.limbo_waits_for_home
                || !self.waiting.is_empty()
                || self
                    .checkpoint
                    .as_ref()
                    .is_some_and(|job| batch.id <= job.homes_through);
            let gathering = index + 1 == self.homes.len() && !full;
            if gathering && !urgent {
                return;
            }
            let mut writes: Vec<Submission> = Vec::new();
            let mut bytes = 0u64;
            let (mut run_index, mut in_run) = (batch.next_run, batch.next_in_run);
            // Paced: one piece at a time, once the previous one is done.
            if !urgent && batch.writes_pending > 0 {
                return;
            }
            while run_index < batch.runs.len() && (urgent || writes.is_empty()) {
                let run = &batch.runs[run_index];
                let length = if urgent {
                    run.length - in_run
                } else {
                    (run.length - in_run).min(HOME_WRITE_BYTES)
                };
                writes.push(Submission::Write {
                    address: self.superblock.data_offset + run.address + in_run,
                    data: batch.buf.as_slice()[run.at + in_run as usize..].as_ptr(),
                    length: length as usize,
                });
                bytes += length;
                in_run += length;
                if in_run == run.length {
                    run_index += 1;
                    in_run = 0;
                }
            }
            // Two slots stay for the blocks of writes started meanwhile.
            if self.free_tags.len() < writes.len() + 2 {
                return;
            }
            let id = batch.id;
            let batch = &mut self.homes[index];
            batch.next_run = run_index;
            batch.next_in_run = in_run;
            batch.issued = run_index == batch.runs.len();
            batch.writes_pending += writes.len() as u32;
            let issued = batch.issued;
            if issued {
                self.stats.home_batches += 1;
            }
            self.stats.data_bytes_written += bytes;
            self.stats.home_writes += writes.len() as u64;
            for write in writes {
                self.issue(DeviceOp::HomeData { batch: id }, write, device);
            }
            if !issued {
                return; // the rest of this batch first, in order
            }
        }
        self.limbo_waits_for_home = false;
    }

    /// The notes of catch-up op `op` (the newest notes) are all there: they commit once block
    /// `complete_seq` is durable.
    #[cold]
    fn complete_catch_up_op(&mut self, op: u64, complete_seq: u64) {
        self.open_catch_up_op = None;
        for note in self.notes.iter_mut().rev() {
            if note.op != op {
                break;
            }
            debug_assert!(note.catch_up && note.complete_seq == u64::MAX);
            note.complete_seq = complete_seq;
        }
    }

    /// Copies a host note for the replication link (replicated masters only: not on the plain path).
    #[cold]
    fn note_created(&mut self, op: u64, request: &IoRequest) {
        if request.origin.is_replication() {
            return; // applied, not created here
        }
        let (kind, data) = match request.kind {
            IoKind::Write => (
                replication::NoteKind::Write,
                request.buf.as_slice().to_vec(),
            ),
            IoKind::Trim => (replication::NoteKind::Trim, Vec::new()),
            _ => (replication::NoteKind::Zero, Vec::new()),
        };
        let outbox = self.outbox.as_mut().expect("checked by the caller");
        debug_assert!(outbox.last().is_none_or(|last| last.op + 1 == op));
        outbox.push(NoteMessage {
            op,
            kind,
            offset: request.offset,
            length: u64::from(request.length),
            data,
        });
    }

    fn start_read(
        &mut self,
        mut request: IoRequest,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) -> Result<(), IoRequest> {
        if self.free_tags.is_empty() {
            return Err(request);
        }
        let mut mappings = self.mapping_pool.pop().unwrap_or_default();
        mappings.clear();
        self.map
            .lookup(request.offset, u64::from(request.length), &mut mappings);
        // Holes and zero extents are filled now; data pieces are read by the device.
        let base = request.offset;
        for mapping in &mappings {
            let (offset, length) = match *mapping {
                Mapping::Hole { offset, length } => (offset, length),
                Mapping::Mapped(Extent {
                    offset,
                    length,
                    location: Location::Zero,
                    ..
                }) => (offset, length),
                Mapping::Mapped(_) => continue,
            };
            let start = (offset - base) as usize;
            request.buf.as_mut_slice()[start..start + length as usize].fill(0);
        }
        mappings.retain(|mapping| {
            matches!(
                mapping,
                Mapping::Mapped(Extent {
                    location: Location::Data(_),
                    ..
                })
            )
        });
        if mappings.is_empty() {
            self.mapping_pool.push(mappings);
            let length = request.length;
            done.push_back(IoCompletion {
                origin: request.origin,
                result: Ok(length),
                buf: request.buf,
            });
            return Ok(());
        }
        let job = ReadJob {
            request,
            mappings,
            next: 0,
            pending: 0,
            started_at: self.free_counter,
            error: None,
        };
        let id = match self.free_reads.pop() {
            Some(id) => {
                self.reads[id as usize] = Some(job);
                id
            }
            None => {
                self.reads.push(Some(job));
                (self.reads.len() - 1) as u32
            }
        };
        self.continue_read(id, device, done);
        Ok(())
    }

    /// Submits more of a read's pieces, or completes it when all are done.
    fn continue_read(
        &mut self,
        id: u32,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        loop {
            let job = self.reads[id as usize].as_mut().expect("live read job");
            if job.next == job.mappings.len() || job.error.is_some() {
                if job.pending == 0 {
                    let job = self.reads[id as usize].take().expect("live read job");
                    self.free_reads.push(id);
                    self.mapping_pool.push(job.mappings);
                    let result = match job.error {
                        Some(error) => Err(error),
                        None => Ok(job.request.length),
                    };
                    done.push_back(IoCompletion {
                        origin: job.request.origin,
                        result,
                        buf: job.request.buf,
                    });
                }
                return;
            }
            let Mapping::Mapped(Extent {
                offset,
                length,
                location: Location::Data(address),
                ..
            }) = job.mappings[job.next]
            else {
                unreachable!("only data mappings are kept");
            };
            let start = (offset - job.request.offset) as usize;
            if !self.homes.is_empty()
                && let Some(staged) = staged_home(&self.homes, address, length)
            {
                job.request.buf.as_mut_slice()[start..start + length as usize]
                    .copy_from_slice(staged);
                job.next += 1;
                continue;
            }
            if self.free_tags.is_empty() {
                return; // resumed when a device op completes
            }
            job.next += 1;
            job.pending += 1;
            let data = job.request.buf.as_mut_slice()[start..start + length as usize].as_mut_ptr();
            let address = self.superblock.data_offset + address;
            self.issue(
                DeviceOp::ReadPiece { read: id },
                Submission::Read {
                    address,
                    data,
                    length: length as usize,
                },
                device,
            );
        }
    }

    fn block_status(&mut self, request: &mut IoRequest) -> u32 {
        let one = request.flags.contains(IoFlags::ONE_EXTENT);
        request.buf.set_len(
            if one { 1 } else { EXTENTS_PER_REPLY_MAX } * crate::volume::EXTENT_RECORD_LEN,
        );
        let mut mappings = self.mapping_pool.pop().unwrap_or_default();
        mappings.clear();
        self.map
            .lookup(request.offset, u64::from(request.length), &mut mappings);
        let mut count = 0u32;
        for &mapping in &mappings {
            let (length, flags) = match mapping {
                Mapping::Hole { length, .. } => (length, EXTENT_HOLE | EXTENT_ZERO),
                Mapping::Mapped(Extent {
                    length,
                    location: Location::Zero,
                    ..
                }) => (length, EXTENT_HOLE | EXTENT_ZERO),
                Mapping::Mapped(Extent { length, .. }) => (length, 0),
            };
            if !push_extent(&mut request.buf, &mut count, length, flags) {
                break;
            }
        }
        self.mapping_pool.push(mappings);
        count
    }

    /// Whether `blocks` more note blocks fit while keeping room for a full checkpoint of the current map.
    fn journal_has_room(&self, blocks: u64) -> bool {
        let ring = self.superblock.journal_blocks();
        let checkpoint_blocks =
            (self.map.extent_count() as u64).div_ceil(EXTENTS_PER_BLOCK as u64) + 2;
        let used = self.next_seq + 1 - self.live_from_seq;
        let in_flight = self.next_seq - self.durable_before;
        used + blocks + checkpoint_blocks + JOURNAL_SPARE_BLOCKS <= ring
            && in_flight + blocks <= self.blocks_in_flight_max()
    }

    /// The seq the open block will get, opening one of `kind` (sealing another kind first).
    fn open_block_seq(&mut self, kind: BlockKind) -> u64 {
        if self.open.as_ref().is_some_and(|open| open.kind != kind) {
            unreachable!("blocks of one kind are sealed before another kind opens");
        }
        if self.open.is_none() {
            let mut buf = self
                .block_pool
                .pop()
                .unwrap_or_else(|| AlignedBuf::with_capacity(JOURNAL_BLOCK_BYTES));
            buf.set_len(JOURNAL_BLOCK_BYTES);
            buf.as_mut_slice().fill(0);
            self.open = Some(OpenBlock {
                buf,
                kind,
                count: 0,
                checkpoint_id: 0,
            });
        }
        self.next_seq
    }

    fn append_note(&mut self, record: &NoteRecord, device: &mut dyn Device) -> u64 {
        let seq = self.open_block_seq(BlockKind::Notes);
        let open = self.open.as_mut().expect("just opened");
        format::put_note(open.buf.as_mut_slice(), open.count, record);
        open.count += 1;
        if open.count == NOTES_PER_BLOCK {
            self.seal(device);
        }
        seq
    }

    /// The watermark a block sealed now records: recovery commits every op up to it (once this block
    /// and all before it are durable): every op given out so far, whatever the commit limit. The
    /// replication protocol relies on that ("durable => committed at recovery"): a restarted master
    /// has every op it acknowledged, and takes a new epoch so that ops its slave may hold beyond its
    /// watermark are never confused with new ones.
    fn commit_through(&self) -> u64 {
        // An open catch-up op is not complete: more items of it may come.
        self.open_catch_up_op.map_or(self.next_op, |open| open) - 1
    }

    /// Seals the open block (header, checksum) and writes it.
    fn seal(&mut self, device: &mut dyn Device) {
        self.seal_with_data(None, device);
    }

    /// Seals the open block and writes it, followed by `inline`, the data of its one note, in the
    /// slots after it (padded to whole slots; see `homes`).
    fn seal_with_data(&mut self, inline: Option<&[u8]>, device: &mut dyn Device) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        let seq = self.next_seq;
        let data_slots = inline.map_or(0, |data| data.len().div_ceil(JOURNAL_BLOCK_BYTES));
        debug_assert!(data_slots <= INLINE_SLOTS_MAX);
        assert!(
            seq + data_slots as u64 - self.live_from_seq < self.superblock.journal_blocks(),
            "journal block {seq} would overwrite a block recovery still needs (live from {})",
            self.live_from_seq
        );
        self.next_seq += 1 + data_slots as u64;
        if open.kind == BlockKind::Notes && open.count > 0 {
            self.lone_writer = open.count == 1;
        }
        let header = BlockHeader {
            volume_id: self.superblock.volume_id,
            seq,
            durable_before: self.durable_before,
            commit_through: self.commit_through(),
            incarnation: self.incarnation,
            kind: open.kind,
            count: open.count as u16,
            data_slots: data_slots as u8,
            checkpoint_id: open.checkpoint_id,
            resume_op: self.resume_op,
        };
        format::seal_block(&mut open.buf.as_mut_slice()[..JOURNAL_BLOCK_BYTES], &header);
        let length = JOURNAL_BLOCK_BYTES * (1 + data_slots);
        if let Some(data) = inline {
            if open.buf.capacity() < length {
                let mut larger =
                    AlignedBuf::with_capacity(JOURNAL_BLOCK_BYTES * (1 + INLINE_SLOTS_MAX));
                larger.set_len(JOURNAL_BLOCK_BYTES);
                larger.as_mut_slice().copy_from_slice(open.buf.as_slice());
                self.block_pool
                    .push(std::mem::replace(&mut open.buf, larger));
            }
            open.buf.set_len(length);
            let slots = &mut open.buf.as_mut_slice()[JOURNAL_BLOCK_BYTES..];
            slots[..data.len()].copy_from_slice(data);
            slots[data.len()..].fill(0);
        }
        let slot = seq % self.superblock.journal_blocks();
        let address = self.superblock.journal_offset + slot * JOURNAL_BLOCK_BYTES as u64;
        let data = open.buf.as_slice().as_ptr();
        self.sealed.push_back(SealedBlock {
            seq,
            buf: open.buf,
            written: false,
            vouches_before: header.durable_before,
        });
        // The data slots take seqs too (recovery skips them); written with the block.
        for data_seq in seq + 1..self.next_seq {
            self.sealed.push_back(SealedBlock {
                seq: data_seq,
                buf: AlignedBuf::empty(),
                written: true,
                vouches_before: header.durable_before,
            });
        }
        self.stats.journal_blocks_written += 1;
        self.stats.journal_bytes_written += length as u64;
        self.issue(
            DeviceOp::JournalBlock { seq },
            Submission::Write {
                address,
                data,
                length,
            },
            device,
        );
    }

    fn issue(&mut self, op: DeviceOp, submission: Submission, device: &mut dyn Device) {
        let tag = self
            .free_tags
            .pop()
            .expect("callers check for a free device slot");
        self.ops[tag as usize] = Some((op, submission));
        self.push_in_order(tag, device);
    }

    /// Pushes `tag` to the device, or queues it behind those that could not be pushed yet.
    fn push_in_order(&mut self, tag: u32, device: &mut dyn Device) {
        if !self.unsubmitted.is_empty() || !self.push(tag, device) {
            self.unsubmitted.push_back(tag);
        }
    }

    /// Issues a data write of note `entry`: it joins this iteration's run when it continues it, else
    /// the run so far is pushed and a new one starts. Runs are pushed by `end_iteration` at the latest,
    /// which comes before the reactor submits: joining costs no latency.
    fn issue_data(
        &mut self,
        entry: u64,
        address: u64,
        data: *const u8,
        length: usize,
        device: &mut dyn Device,
    ) {
        if !self.data_run.is_empty()
            && (address != self.data_run_end
                || self.data_run.len() == DATA_RUN_WRITES_MAX
                || self.data_run_bytes + length > DATA_RUN_BYTES_MAX)
        {
            self.push_data_run(device);
        }
        let tag = self
            .free_tags
            .pop()
            .expect("callers check for a free device slot");
        self.ops[tag as usize] = Some((
            DeviceOp::NoteData { entry },
            Submission::Write {
                address,
                data,
                length,
            },
        ));
        self.data_run.push(tag);
        self.data_run_end = address + length as u64;
        self.data_run_bytes += length;
    }

    /// Pushes the data writes gathered by `issue_data`: a lone write as it is, several as one
    /// vectored write carried by the first one's tag.
    fn push_data_run(&mut self, device: &mut dyn Device) {
        let Some(&lead) = self.data_run.first() else {
            return;
        };
        if self.data_run.len() > 1 {
            let mut run = self.run_pool.pop().unwrap_or_default();
            debug_assert!(run.riders.is_empty() && run.segments.is_empty());
            let mut start = None;
            let mut next = 0;
            for &tag in &self.data_run {
                let Some((
                    _,
                    Submission::Write {
                        address,
                        data,
                        length,
                    },
                )) = self.ops[tag as usize]
                else {
                    unreachable!("a data run holds plain writes");
                };
                debug_assert!(start.is_none() || address == next, "a run is consecutive");
                start.get_or_insert(address);
                next = address + length as u64;
                run.segments.push(libc::iovec {
                    iov_base: data.cast_mut().cast(),
                    iov_len: length,
                });
            }
            run.riders.extend_from_slice(&self.data_run[1..]);
            let slot = self.ops[lead as usize].as_mut().expect("issued op");
            slot.1 = Submission::WriteRun {
                address: start.expect("a run has a first write"),
                segments: run.segments.as_ptr(),
                count: run.segments.len(),
                length: self.data_run_bytes,
            };
            debug_assert!(self.runs[lead as usize].is_none());
            self.runs[lead as usize] = Some(run);
            self.stats.data_runs += 1;
        }
        self.stats.data_writes += 1;
        self.data_run.clear();
        self.data_run_bytes = 0;
        self.push_in_order(lead, device);
    }

    fn push(&mut self, tag: u32, device: &mut dyn Device) -> bool {
        let (_, submission) = self.ops[tag as usize].expect("issued op");
        let dsync = self.durability == Durability::Dsync;
        match submission {
            Submission::Write {
                address,
                data,
                length,
            } => {
                // SAFETY: write sources are note request buffers, the zero buffer and sealed journal
                // blocks, all owned by `self` (in `notes`, `zeros`, `sealed`) until this tag completes;
                // their heap memory does not move.
                unsafe { device.write(tag, address, data, length, dsync) }
            }
            Submission::WriteRun {
                address,
                segments,
                count,
                length: _,
            } => {
                // SAFETY: the segments are note data as above; the iovec array is in
                // `self.runs[tag]`, which is not touched until this tag completes.
                unsafe { device.write_vectored(tag, address, segments, count, dsync) }
            }
            Submission::Read {
                address,
                data,
                length,
            } => {
                // SAFETY: read targets are slices of a read job's request buffer, kept in `reads` until
                // every piece has completed, or of a catch-up source item's buffer, kept in `sources`
                // (even once stopped) until its reads have completed; heap memory that does not move.
                unsafe { device.read(tag, address, data, length) }
            }
            Submission::Sync => device.sync(tag),
        }
    }

    /// Called once per reactor iteration: write this iteration's batch, move checkpoints along, retry
    /// what was parked.
    pub fn end_iteration(&mut self, device: &mut dyn Device, done: &mut VecDeque<IoCompletion>) {
        while let Some(&tag) = self.unsubmitted.front() {
            if !self.push(tag, device) {
                break;
            }
            self.unsubmitted.pop_front();
        }
        // Writes reserve a device slot for sealing their block when they start, but reads started since
        // may have taken every slot: then the block stays open until one is free.
        if !self.free_tags.is_empty() {
            self.seal(device);
        }
        self.checkpoint_step(device);
        self.advance(device, done);
        self.retry_waiting(device, done);
        self.issue_homes(device);
        self.write_vouching_block(device);
        // Notes started above (`retry_waiting`) are sealed and their data pushed now: the reactor may
        // sleep after this, and nothing of theirs is in flight to wake it (`has_unissued_work`).
        if self.has_open_notes() && !self.free_tags.is_empty() {
            self.seal(device);
        }
        self.push_data_run(device);
    }

    /// Hands the data writes gathered so far to the device now, instead of at the end of the
    /// iteration: a replication master's local writes go to the device before their notes go to the
    /// slave.
    pub fn push_gathered_writes(&mut self, device: &mut dyn Device) {
        self.push_data_run(device);
    }

    fn has_open_notes(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|open| open.kind == BlockKind::Notes && open.count > 0)
    }

    /// Whether this copy holds IO it has not handed to the device yet: data writes gathered into a run,
    /// or notes in a block not sealed. Requests started after `end_iteration` (a reactor's
    /// connections, given completions, may submit more) leave such work; a reactor must run another
    /// iteration before it sleeps, or nothing would ever complete them.
    pub fn has_unissued_work(&self) -> bool {
        // An open block with no device slot to seal it waits for a completion, which will wake the
        // reactor: not work it could do now.
        !self.data_run.is_empty() || self.has_open_notes() && !self.free_tags.is_empty()
    }

    /// Requests wait (perhaps for space) while data space waits for a header to vouch for a block
    /// (`limbo`, `resume_seq`) and no block that could is in flight: write an empty notes block. (Two at
    /// most: one that vouches for the blocks before it, one that vouches for that one.)
    fn write_vouching_block(&mut self, device: &mut dyn Device) {
        let unvouched = self
            .limbo
            .front()
            .is_some_and(|&(_, vouching_seq, _)| vouching_seq >= self.vouched_before)
            || self.vouched_before <= self.resume_seq;
        if unvouched
            && !self.waiting.is_empty()
            && self.open.is_none()
            && self.sealed.is_empty()
            && self.failed.is_none()
            && self.free_tags.len() >= 2
            && self.journal_has_room(1)
        {
            self.open_block_seq(BlockKind::Notes);
            self.seal(device);
        }
    }

    fn retry_waiting(&mut self, device: &mut dyn Device, done: &mut VecDeque<IoCompletion>) {
        while let Some(request) = self.waiting.pop_front() {
            if let Err(request) = self.start(request, device, done) {
                self.waiting.push_front(request);
                break;
            }
        }
        // Writes that could not start did not open a block; anything they appended is sealed next time.
    }

    /// A device operation finished.
    pub fn complete(
        &mut self,
        tag: u32,
        result: i32,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        let Some((op, submission)) = self.ops.get_mut(tag as usize).and_then(Option::take) else {
            debug_assert!(false, "completion for unknown device tag {tag}");
            return;
        };
        self.free_tags.push(tag);
        let expected = match submission {
            Submission::Write { length, .. }
            | Submission::WriteRun { length, .. }
            | Submission::Read { length, .. } => length as i32,
            Submission::Sync => 0,
        };
        let error = (result != expected).then(|| {
            if result < 0 {
                VolumeError::from_errno(result)
            } else {
                VolumeError::Io(libc::EIO)
            }
        });
        if let Submission::WriteRun { .. } = submission {
            let mut run = self.runs[tag as usize]
                .take()
                .expect("a vectored write carries a run");
            for &rider in &run.riders {
                let (rider_op, _) = self.ops[rider as usize]
                    .take()
                    .expect("a run's rider is issued");
                self.free_tags.push(rider);
                self.complete_op(rider_op, error, device, done);
            }
            run.riders.clear();
            run.segments.clear();
            self.run_pool.push(run);
        }
        self.complete_op(op, error, device, done);
        self.advance(device, done);
    }

    /// The bookkeeping of one finished device operation: `error` is its failure, if any.
    fn complete_op(
        &mut self,
        op: DeviceOp,
        error: Option<VolumeError>,
        device: &mut dyn Device,
        done: &mut VecDeque<IoCompletion>,
    ) {
        match op {
            DeviceOp::NoteData { entry } => {
                let front = self.notes.front().map_or(u64::MAX, |note| note.entry);
                let queued = entry
                    .checked_sub(front)
                    .and_then(|index| self.notes.get_mut(index as usize));
                if let Some(note) = queued {
                    note.data_pending -= 1;
                    if let Some(error) = error {
                        note.failed = true;
                        self.fail(error);
                    }
                } else {
                    // A dropped note: its outcome no longer matters, only when its buffer is free.
                    let index = self
                        .discarded
                        .iter()
                        .position(|note| note.entry == entry)
                        .expect("data completion for a live or dropped note");
                    self.discarded[index].data_pending -= 1;
                    if self.discarded[index].data_pending == 0 {
                        let note = self.discarded.swap_remove(index);
                        self.release_discarded(note, done);
                    }
                }
            }
            DeviceOp::JournalBlock { seq } => {
                let front = self.sealed.front().map_or(seq, |block| block.seq);
                let block = &mut self.sealed[(seq - front) as usize];
                block.written = true;
                // Written: the buffer is free again (write-back keeps many blocks unsynced).
                let buf = std::mem::replace(&mut block.buf, AlignedBuf::empty());
                self.block_pool.push(buf);
                // Blocks from `unwritten_from` on are all still in `sealed` (only written blocks
                // leave it, from the front).
                while self.unwritten_from < self.next_seq
                    && self.sealed[(self.unwritten_from - front) as usize].written
                {
                    self.unwritten_from += 1;
                }
                if let Some(error) = error {
                    self.fail(error);
                }
            }
            DeviceOp::Sync {
                covers_before,
                homes_through,
            } => {
                self.syncs_in_flight -= 1;
                match error {
                    Some(error) => self.fail(error),
                    None => {
                        self.durable_before = self.durable_before.max(covers_before);
                        self.homes_durable_through = self.homes_durable_through.max(homes_through);
                    }
                }
            }
            DeviceOp::HomeData { batch } => {
                let front = self.homes.front().map_or(batch, |home| home.id);
                let home = &mut self.homes[(batch - front) as usize];
                home.writes_pending -= 1;
                if let Some(error) = error {
                    home.failed = true;
                    self.fail(error);
                }
                // Batches finish in id order: a later one may complete first, and waits here.
                while let Some(home) = self.homes.front() {
                    if !home.issued || home.writes_pending > 0 || home.failed {
                        break;
                    }
                    let home = self.homes.pop_front().expect("front exists");
                    self.homes_written_through = home.id;
                    if self.durability == Durability::Dsync {
                        self.homes_durable_through = home.id;
                    }
                    self.home_pool.push(home.buf);
                }
            }
            DeviceOp::SourceRead { slot, item } => {
                let source = self.sources[slot as usize]
                    .as_mut()
                    .expect("a source with reads in flight");
                let front = (source.next - source.items.len()) as u64;
                let entry = &mut source.items[(item - front) as usize];
                entry.pending -= 1;
                if let Some(error) = error {
                    source.failed.get_or_insert(error);
                }
                if source.stopped && source.items.iter().all(|item| item.pending == 0) {
                    self.sources[slot as usize] = None;
                }
            }
            DeviceOp::ReadPiece { read } => {
                let job = self.reads[read as usize].as_mut().expect("live read job");
                job.pending -= 1;
                if let Some(error) = error {
                    job.error.get_or_insert(error);
                }
                self.continue_read(read, device, done);
            }
        }
    }

    /// A write or sync failed: nothing more can be made durable safely. Reads of committed data go on;
    /// writes fail until the volume is reopened (and recovered).
    fn fail(&mut self, error: VolumeError) {
        if self.failed.is_none() {
            tracing::error!(%error, committed_op = self.committed_op, "volume copy failed: refusing writes");
            self.failed = Some(error);
        }
    }

    /// Moves durability forward, commits durable notes in op order and acknowledges them.
    fn advance(&mut self, device: &mut dyn Device, done: &mut VecDeque<IoCompletion>) {
        // Everything before the first block that is unwritten, or that holds a note whose data is
        // still in flight, is ready to be made durable.
        debug_assert_eq!(
            self.unwritten_from,
            self.sealed
                .iter()
                .find(|block| !block.written)
                .map_or(self.next_seq, |block| block.seq)
        );
        let mut ready_before = self.unwritten_from;
        if let Some(note) = self.notes.iter().find(|note| note.data_pending > 0) {
            ready_before = ready_before.min(note.first_seq);
        }
        // A dropped note's block is not claimed durable before its data is written either: until
        // the discard is durable, recovery may replay it without checking its data.
        if !self.discarded.is_empty()
            && let Some(first_seq) = self.discarded.iter().map(|note| note.first_seq).min()
        {
            ready_before = ready_before.min(first_seq);
        }
        if self.failed.is_none() {
            match self.durability {
                Durability::Dsync => self.durable_before = self.durable_before.max(ready_before),
                Durability::Fdatasync | Durability::WriteBack => {
                    // A checkpoint waits for written homes to be durable (`HomeBatch`).
                    let homes_wanted = self.checkpoint.as_ref().is_some_and(|job| {
                        matches!(job.phase, CheckpointPhase::AwaitDurable { .. })
                            && self.homes_durable_through < job.homes_through
                            && self.homes_written_through >= job.homes_through
                    });
                    // Only what no sync in flight covers: blocks written since the last one issued.
                    let uncovered =
                        ready_before > self.durable_before.max(self.sync_issued_covers_before);
                    // A second sync only for a host waiting on it (see `SYNCS_IN_FLIGHT_MAX`);
                    // the copy's own needs take one at a time.
                    let wanted = if self.syncs_in_flight == 0 {
                        uncovered
                            && (self.durability == Durability::Fdatasync || self.sync_wanted())
                            || homes_wanted
                    } else {
                        uncovered && self.host_waits_for_sync(ready_before)
                    };
                    if self.syncs_in_flight < self.syncs_in_flight_max
                        && !self.free_tags.is_empty()
                        && wanted
                    {
                        self.syncs_in_flight += 1;
                        self.sync_issued_covers_before = ready_before;
                        self.stats.syncs += 1;
                        self.data_bytes_at_sync = self.stats.data_bytes_written;
                        self.issue(
                            DeviceOp::Sync {
                                covers_before: ready_before,
                                homes_through: self.homes_written_through,
                            },
                            Submission::Sync,
                            device,
                        );
                    }
                }
            }
        }
        while let Some(block) = self.sealed.front() {
            if block.seq >= self.durable_before || !block.written {
                break;
            }
            let block = self.sealed.pop_front().expect("front exists");
            self.vouched_before = self.vouched_before.max(block.vouches_before);
            debug_assert!(
                block.buf.is_empty(),
                "a written block's buffer went back to the pool"
            );
        }
        if self.durability == Durability::WriteBack {
            self.advance_write_back(done);
        }
        // Write-back commits what is written; the other modes what is durable.
        let commit_before = if self.durability == Durability::WriteBack {
            ready_before
        } else {
            self.durable_before
        };
        // Commit, strictly in op order.
        while let Some(note) = self.notes.front() {
            let durable = note.last_seq < commit_before
                && note.complete_seq < commit_before
                && note.data_pending == 0
                && !note.failed;
            if let Some(error) = self.failed {
                if note.data_pending > 0 {
                    break;
                }
                let mut note = self.notes.pop_front().expect("front exists");
                for piece in note.pieces.drain(..) {
                    self.allocator.free(piece);
                }
                self.piece_pool.push(note.pieces);
                let request = note
                    .request
                    .take()
                    .expect("uncompleted note has its request");
                done.push_back(IoCompletion {
                    origin: request.origin,
                    result: Err(error),
                    buf: request.buf,
                });
                continue;
            }
            if !durable || note.op > self.commit_limit {
                break;
            }
            // A catch-up op commits as a whole, so that a checkpoint never holds part of it.
            if note.catch_up && !self.catch_up_op_durable(note.op, commit_before) {
                break;
            }
            let mut note = self.notes.pop_front().expect("front exists");
            debug_assert!(
                note.op == self.committed_op + 1 || note.catch_up && note.op >= self.committed_op,
                "commits go strictly in op order: op {} after {}",
                note.op,
                self.committed_op
            );
            let request = note
                .request
                .take()
                .expect("uncompleted note has its request");
            match note.kind {
                NoteKind::Write => {
                    let mut position = request.offset;
                    for piece in &note.pieces {
                        let extent = Extent {
                            offset: position,
                            length: piece.length,
                            op: note.op,
                            location: Location::Data(piece.address),
                        };
                        self.map.insert(extent, &mut self.freed);
                        position += piece.length;
                    }
                }
                // A zero-length catch-up note (a jump) has no extent.
                NoteKind::Zero if request.length == 0 => {}
                NoteKind::Zero => {
                    let extent = Extent {
                        offset: request.offset,
                        length: u64::from(request.length),
                        op: note.op,
                        location: Location::Zero,
                    };
                    self.map.insert(extent, &mut self.freed);
                }
            }
            self.committed_op = note.op;
            let note_durable_before = note.last_seq.max(note.complete_seq) + 1;
            if !self.freed.is_empty() {
                self.free_counter += 1;
                if note_durable_before <= self.durable_before {
                    // The next block sealed carries a `durable_before` above this note's blocks.
                    let vouching_seq = self.next_seq;
                    for piece in self.freed.drain(..) {
                        self.limbo
                            .push_back((self.free_counter, vouching_seq, piece));
                    }
                } else {
                    for piece in self.freed.drain(..) {
                        self.freed_unsynced.push_back((
                            self.free_counter,
                            note_durable_before,
                            piece,
                        ));
                    }
                }
            }
            note.pieces.clear();
            self.piece_pool.push(note.pieces);
            let fua = request.flags.contains(IoFlags::FUA);
            let length = request.length;
            let completion = IoCompletion {
                origin: request.origin,
                result: Ok(length),
                buf: request.buf,
            };
            // Write-back: a FUA write is acknowledged once durable; later writes do not wait for it
            // (NBD replies need no order). In the other modes every committed note is durable.
            if fua && note_durable_before > self.durable_before {
                self.acks_awaiting_sync
                    .push_back((note_durable_before, completion));
            } else {
                done.push_back(completion);
            }
        }
        if self.durability == Durability::WriteBack {
            self.advance_write_back(done);
        }
        self.release_limbo();
    }

    /// Write-back: whether to make what is written durable now. A sync costs the device a cache
    /// flush: about as much as writing back everything written since the last one, with the writes
    /// behind it waiting (tuning.md §3). So syncs are issued only when something needs one: a FLUSH
    /// or FUA write waiting; a checkpoint whose blocks are all written; requests parked (for space,
    /// journal room, or the first vouched block after recovery); space to reuse while free space
    /// runs low; or half the journal blocks recovery allows in flight unsynced.
    fn sync_wanted(&self) -> bool {
        let spare = self
            .superblock
            .data_bytes
            .saturating_sub(self.superblock.volume_size);
        !self.flushes.is_empty()
            || !self.acks_awaiting_sync.is_empty()
            || self.checkpoint.as_ref().is_some_and(|job| {
                matches!(
                    job.phase,
                    CheckpointPhase::AwaitDurable { .. } | CheckpointPhase::AwaitDone { .. }
                )
            })
            || !self.waiting.is_empty()
            || self.next_seq - self.durable_before >= self.blocks_in_flight_max() / 2
            || self.stats.data_bytes_written - self.data_bytes_at_sync >= UNSYNCED_DATA_BYTES_MAX
            || (!self.freed_unsynced.is_empty() || !self.limbo.is_empty())
                && self.allocator.free_bytes() < spare / 4
    }

    /// Whether a host request waits for a sync that would cover blocks before `ready_before` but
    /// that the syncs issued do not: in `Fdatasync` mode, while any write is not committed; in
    /// write-back, a FLUSH or a FUA write that needs such a block.
    fn host_waits_for_sync(&self, ready_before: u64) -> bool {
        let issued = self.sync_issued_covers_before;
        let waits = |needed: u64| needed > issued && needed <= ready_before;
        match self.durability {
            // Any note not committed: also when the blocks the first sync does not cover are the
            // copy's own (checkpoint blocks). Asking for a note the first sync does not cover
            // instead measured 1.17-1.33x with `ferroblock bench` but 0.84-0.90x with fio at QD32
            // (bench/RESULTS.md, "two syncs in flight"): not kept.
            Durability::Fdatasync => !self.notes.is_empty(),
            Durability::WriteBack => {
                self.flushes.iter().any(|&(needed, _)| waits(needed))
                    || self
                        .acks_awaiting_sync
                        .iter()
                        .any(|&(needed, _)| waits(needed))
            }
            Durability::Dsync => false,
        }
    }

    /// Journal blocks this copy keeps in flight at most (see `JOURNAL_BLOCKS_IN_FLIGHT_MAX`): a
    /// quarter of a small ring, so that checkpoints always find room.
    fn blocks_in_flight_max(&self) -> u64 {
        JOURNAL_BLOCKS_IN_FLIGHT_MAX.min(self.superblock.journal_blocks() / 4)
    }

    /// Write-back: completes the acknowledgements and flushes that `durable_before` now covers (or
    /// fails them), and moves overwritten space whose overwriting note is durable to `limbo`.
    fn advance_write_back(&mut self, done: &mut VecDeque<IoCompletion>) {
        if let Some(error) = self.failed {
            for (_, mut completion) in self
                .acks_awaiting_sync
                .drain(..)
                .chain(self.flushes.drain(..))
            {
                completion.result = Err(error);
                done.push_back(completion);
            }
        }
        while let Some(&(needed, _)) = self.acks_awaiting_sync.front() {
            if needed > self.durable_before {
                break;
            }
            let (_, completion) = self.acks_awaiting_sync.pop_front().expect("front exists");
            done.push_back(completion);
        }
        if !self.flushes.is_empty() {
            let durable_before = self.durable_before;
            let mut index = 0;
            while index < self.flushes.len() {
                if self.flushes[index].0 <= durable_before {
                    done.push_back(self.flushes.swap_remove(index).1);
                } else {
                    index += 1;
                }
            }
        }
        while let Some(&(free_counter, needed, piece)) = self.freed_unsynced.front() {
            if needed > self.durable_before {
                break;
            }
            self.freed_unsynced.pop_front();
            // The next block sealed carries a `durable_before` above the freeing note's blocks.
            self.limbo.push_back((free_counter, self.next_seq, piece));
        }
    }

    /// Whether every note of catch-up op `op` (the first notes in the queue) can commit.
    #[cold]
    fn catch_up_op_durable(&self, op: u64, commit_before: u64) -> bool {
        self.notes
            .iter()
            .take_while(|note| note.op == op)
            .all(|note| {
                note.last_seq < commit_before
                    && note.complete_seq < commit_before
                    && note.data_pending == 0
                    && !note.failed
            })
    }

    /// Frees overwritten space once every read that might still read it has finished.
    fn release_limbo(&mut self) {
        let oldest_read = self
            .reads
            .iter()
            .flatten()
            .map(|job| job.started_at)
            .chain(
                self.sources
                    .iter()
                    .flatten()
                    .map(|source| source.started_at),
            )
            .min()
            .unwrap_or(u64::MAX);
        while let Some(&(freed_at, vouching_seq, piece)) = self.limbo.front() {
            if freed_at > oldest_read || vouching_seq >= self.vouched_before {
                break;
            }
            // Space an inline note's home write has yet to reach: reused only once it has, or that
            // write would land on the new data.
            if let Some(batch) = self.homes.iter().find(|batch| {
                batch
                    .runs
                    .iter()
                    .any(|run| run.overlaps(piece.address, piece.length))
            }) {
                self.limbo_waits_for_home |= !batch.issued;
                break;
            }
            self.limbo.pop_front();
            self.allocator.free(piece);
        }
    }

    /// Starts a checkpoint when the journal is half full, and moves a running one along.
    fn checkpoint_step(&mut self, device: &mut dyn Device) {
        if self.failed.is_some() {
            return;
        }
        let ring = self.superblock.journal_blocks();
        if self.checkpoint.is_none() && self.next_seq - self.live_from_seq > ring / 2 {
            self.checkpoint_id += 1;
            let replay_from_seq = self
                .notes
                .front()
                .map_or(self.next_seq, |note| note.first_seq);
            self.checkpoint = Some(CheckpointJob {
                id: self.checkpoint_id,
                op: self.committed_op,
                snapshot: self.map.snapshot(),
                first_seq: self.next_seq,
                replay_from_seq,
                homes_through: self.next_home_batch - 1,
                count: 0,
                crc: 0,
                records: Vec::new(),
                records_written: 0,
                phase: CheckpointPhase::Writing { cursor: 0 },
            });
        }
        let Some(mut job) = self.checkpoint.take() else {
            return;
        };
        match job.phase {
            CheckpointPhase::Writing { mut cursor } => {
                let ring = self.superblock.journal_blocks();
                let mut mappings = Vec::new();
                for _ in 0..CHECKPOINT_BLOCKS_PER_ITERATION {
                    if job.records_written == job.records.len() {
                        job.records.clear();
                        job.records_written = 0;
                        if cursor >= self.superblock.volume_size {
                            break;
                        }
                        let step = CHECKPOINT_SCAN_BYTES.min(self.superblock.volume_size - cursor);
                        mappings.clear();
                        job.snapshot.lookup(cursor, step, &mut mappings);
                        cursor += step;
                        job.records
                            .extend(mappings.iter().filter_map(|mapping| match mapping {
                                Mapping::Mapped(extent) => Some(ExtentRecord {
                                    offset: extent.offset,
                                    length: extent.length,
                                    op: extent.op,
                                    location: match extent.location {
                                        Location::Data(address) => address,
                                        Location::Zero => LOCATION_ZERO,
                                    },
                                }),
                                Mapping::Hole { .. } => None,
                            }));
                        continue;
                    }
                    // Room for this block (and the notes block sealed before it) in flight and in the ring.
                    let in_flight = self.next_seq - self.durable_before;
                    if self.free_tags.len() < 4
                        || in_flight + 2 > self.blocks_in_flight_max()
                        || self.next_seq + 2 - self.live_from_seq > ring
                    {
                        break;
                    }
                    self.seal(device); // notes of this iteration go first
                    self.open_block_seq(BlockKind::CheckpointExtents);
                    let chunk_end =
                        (job.records_written + EXTENTS_PER_BLOCK).min(job.records.len());
                    let chunk = &job.records[job.records_written..chunk_end];
                    let open = self.open.as_mut().expect("just opened");
                    open.checkpoint_id = job.id;
                    for (index, record) in chunk.iter().enumerate() {
                        format::put_extent(open.buf.as_mut_slice(), index, record);
                    }
                    open.count = chunk.len();
                    job.crc = crc32c::crc32c_append(
                        job.crc,
                        format::extent_bytes(open.buf.as_slice(), chunk.len()),
                    );
                    job.count += chunk.len() as u64;
                    job.records_written = chunk_end;
                    self.seal(device);
                }
                job.phase = if cursor >= self.superblock.volume_size
                    && job.records_written == job.records.len()
                {
                    CheckpointPhase::AwaitDurable {
                        end_seq: self.next_seq,
                    }
                } else {
                    CheckpointPhase::Writing { cursor }
                };
            }
            CheckpointPhase::AwaitDurable { end_seq } => {
                // Two slots: the open notes block, then the done block.
                if self.durable_before >= end_seq
                    && self.homes_durable_through >= job.homes_through
                    && self.free_tags.len() >= 2
                {
                    self.seal(device);
                    self.open_block_seq(BlockKind::CheckpointDone);
                    let open = self.open.as_mut().expect("just opened");
                    let done = CheckpointDone {
                        checkpoint_id: job.id,
                        op: job.op,
                        first_seq: job.first_seq,
                        end_seq,
                        extent_count: job.count,
                        extents_crc: job.crc,
                        replay_from_seq: job.replay_from_seq,
                    };
                    format::put_checkpoint_done(open.buf.as_mut_slice(), &done);
                    open.count = 1;
                    let done_seq = self.next_seq;
                    self.seal(device);
                    job.phase = CheckpointPhase::AwaitDone { done_seq };
                }
            }
            CheckpointPhase::AwaitDone { done_seq } => {
                if self.durable_before > done_seq {
                    self.live_from_seq = job.replay_from_seq;
                    self.stats.checkpoints += 1;
                    tracing::info!(
                        checkpoint = job.id,
                        op = job.op,
                        extents = job.count,
                        "checkpoint durable"
                    );
                    return; // job finished
                }
            }
        }
        self.checkpoint = Some(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::Piece;
    use crate::volume::open::tests::request as block_request;

    /// A device that completes nothing until the test says: it lists what was submitted, by tag.
    #[derive(Default)]
    struct HeldDevice {
        writes: Vec<u32>,
        syncs: Vec<u32>,
    }

    impl Device for HeldDevice {
        unsafe fn write(&mut self, tag: u32, _: u64, _: *const u8, _: usize, _: bool) -> bool {
            self.writes.push(tag);
            true
        }

        unsafe fn write_vectored(
            &mut self,
            tag: u32,
            _: u64,
            _: *const libc::iovec,
            _: usize,
            _: bool,
        ) -> bool {
            self.writes.push(tag);
            true
        }

        unsafe fn read(&mut self, _: u32, _: u64, _: *mut u8, _: usize) -> bool {
            unreachable!("these tests read nothing")
        }

        fn sync(&mut self, tag: u32) -> bool {
            self.syncs.push(tag);
            true
        }
    }

    impl HeldDevice {
        /// Submits a 4 KiB write of `fill` at `offset` and completes the device writes it makes.
        fn write(
            &mut self,
            copy: &mut VolumeCopy,
            done: &mut VecDeque<IoCompletion>,
            offset: u64,
            fill: u8,
        ) {
            copy.submit(block_request(IoKind::Write, offset, fill), self, done);
            copy.end_iteration(self, done);
            self.complete_writes(copy, done);
        }

        /// Completes every write, successfully, until the copy submits no more.
        fn complete_writes(&mut self, copy: &mut VolumeCopy, done: &mut VecDeque<IoCompletion>) {
            while !self.writes.is_empty() {
                self.complete_submitted_writes(copy, done);
            }
        }

        fn complete_submitted_writes(
            &mut self,
            copy: &mut VolumeCopy,
            done: &mut VecDeque<IoCompletion>,
        ) {
            for tag in std::mem::take(&mut self.writes) {
                // Writes are of whole journal blocks or 4 KiB data: the length only has to be right.
                let length = match copy.ops[tag as usize] {
                    Some((
                        _,
                        Submission::Write { length, .. } | Submission::WriteRun { length, .. },
                    )) => length,
                    other => panic!("tag {tag} is not a write: {other:?}"),
                };
                copy.complete(tag, length as i32, self, done);
            }
            copy.end_iteration(self, done);
        }

        fn complete_sync(
            &mut self,
            index: usize,
            copy: &mut VolumeCopy,
            done: &mut VecDeque<IoCompletion>,
        ) {
            let tag = self.syncs.remove(index);
            copy.complete(tag, 0, self, done);
            copy.end_iteration(self, done);
        }
    }

    /// A new copy that has taken one write (op 1, at offset 1 MiB), acknowledged and durable: a
    /// copy's first write waits for a durable block to vouch for its incarnation (`resume_seq`).
    fn copy_with(durability: Durability, device: &mut HeldDevice) -> VolumeCopy {
        let superblock = Superblock::with_regions(3, "syncs", 4 << 20, 1024, 8 << 20);
        let mut copy = VolumeCopy::new(
            superblock.clone(),
            Recovered::empty(),
            Allocator::new(superblock.data_bytes),
            durability,
        );
        let mut done = VecDeque::new();
        device.write(&mut copy, &mut done, 1 << 20, 0);
        while done.is_empty() || !device.syncs.is_empty() {
            device.complete_writes(&mut copy, &mut done);
            while !device.syncs.is_empty() {
                device.complete_sync(0, &mut copy, &mut done);
            }
        }
        assert_eq!(done.pop_front().map(|c| c.result), Some(Ok(4096)));
        assert_eq!(copy.committed_op(), 1);
        copy
    }

    /// A write that lands while a sync runs gets a second sync at once (not after the first), and
    /// either may complete first: the later one covers both, and commits stay in op order.
    #[test]
    fn a_waiting_write_gets_a_second_sync_in_flight() {
        let mut device = HeldDevice::default();
        let mut copy = copy_with(Durability::Fdatasync, &mut device);
        let mut done = VecDeque::new();
        device.write(&mut copy, &mut done, 0, 1);
        assert_eq!(device.syncs.len(), 1, "the first write's sync");
        device.write(&mut copy, &mut done, 4096, 2);
        assert_eq!(device.syncs.len(), 2, "a second sync, for the second write");
        device.write(&mut copy, &mut done, 8192, 3);
        assert_eq!(device.syncs.len(), 2, "never more than SYNCS_IN_FLIGHT_MAX");
        assert!(
            done.is_empty(),
            "nothing is acknowledged before it is durable"
        );
        device.complete_sync(1, &mut copy, &mut done);
        assert_eq!(copy.committed_op(), 3, "the second sync covers ops 2 and 3");
        let acknowledged: Vec<u64> = done.drain(..).map(|c| c.buf.as_slice()[0].into()).collect();
        assert_eq!(acknowledged, [1, 2], "in op order");
        assert_eq!(device.syncs.len(), 2, "the third write's sync replaces it");
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(copy.committed_op(), 3, "the first sync covers nothing new");
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(copy.committed_op(), 4);
        assert_eq!(done.drain(..).count(), 1);
        assert!(device.syncs.is_empty());
        // The earlier sync completing first commits only what it covers.
        device.write(&mut copy, &mut done, 12288, 4);
        device.write(&mut copy, &mut done, 16384, 5);
        assert_eq!(device.syncs.len(), 2);
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(copy.committed_op(), 5, "the first sync covers op 5 only");
        let acknowledged: Vec<u64> = done.drain(..).map(|c| c.buf.as_slice()[0].into()).collect();
        assert_eq!(acknowledged, [4]);
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(copy.committed_op(), 6);
        assert_eq!(done.len(), 1);
        assert!(device.syncs.is_empty());
    }

    /// On buffered IO a second sync could take the write-back error the first one should report.
    #[test]
    fn buffered_io_keeps_one_sync_in_flight() {
        let mut device = HeldDevice::default();
        let mut copy = copy_with(Durability::Fdatasync, &mut device);
        copy.one_sync_at_a_time();
        let mut done = VecDeque::new();
        device.write(&mut copy, &mut done, 0, 1);
        device.write(&mut copy, &mut done, 4096, 2);
        assert_eq!(device.syncs.len(), 1);
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(
            device.syncs.len(),
            1,
            "the second write's sync, once the first is done"
        );
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(copy.committed_op(), 3);
        assert_eq!(done.len(), 2);
    }

    /// Write-back: a second sync only for a FLUSH or FUA write the sync in flight does not cover;
    /// plain writes never ask for one.
    #[test]
    fn write_back_takes_a_second_sync_only_for_a_waiting_flush() {
        let mut device = HeldDevice::default();
        let mut copy = copy_with(Durability::WriteBack, &mut device);
        let mut done = VecDeque::new();
        let write_then_flush = |copy: &mut VolumeCopy,
                                device: &mut HeldDevice,
                                done: &mut VecDeque<IoCompletion>,
                                offset: u64,
                                flush: bool| {
            device.write(copy, done, offset, 1);
            assert_eq!(
                done.pop_front().map(|c| c.result),
                Some(Ok(4096)),
                "acknowledged once written"
            );
            if flush {
                let mut flush = block_request(IoKind::Flush, 0, 0);
                flush.length = 0;
                copy.submit(flush, device, done);
                copy.end_iteration(device, done);
            }
        };
        write_then_flush(&mut copy, &mut device, &mut done, 0, true);
        assert_eq!(device.syncs.len(), 1, "the flush's sync");
        write_then_flush(&mut copy, &mut device, &mut done, 4096, false);
        assert_eq!(device.syncs.len(), 1, "a plain write waits for no sync");
        write_then_flush(&mut copy, &mut device, &mut done, 8192, true);
        assert_eq!(
            device.syncs.len(),
            2,
            "the second flush is not covered by the first sync"
        );
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(done.len(), 1, "the first sync covers the first flush only");
        device.complete_sync(0, &mut copy, &mut done);
        assert_eq!(done.len(), 2);
        assert!(done.drain(..).all(|c| c.result == Ok(0)));
        assert!(device.syncs.is_empty());
        // A FUA write while a sync runs gets the second one; the later sync may complete first.
        write_then_flush(&mut copy, &mut device, &mut done, 12288, true);
        assert_eq!(device.syncs.len(), 1);
        let mut fua = block_request(IoKind::Write, 16384, 9);
        fua.flags = IoFlags::FUA;
        copy.submit(fua, &mut device, &mut done);
        copy.end_iteration(&mut device, &mut done);
        device.complete_writes(&mut copy, &mut done);
        assert!(done.is_empty(), "a FUA write waits for its sync");
        assert_eq!(device.syncs.len(), 2, "the FUA write's sync");
        device.complete_sync(1, &mut copy, &mut done);
        assert_eq!(
            done.len(),
            2,
            "the later sync covers the flush and the FUA write"
        );
        assert!(done.drain(..).all(|c| c.result.is_ok()));
        device.complete_sync(0, &mut copy, &mut done);
        assert!(device.syncs.is_empty());
        assert!(copy.is_idle());
    }

    /// A lone writer's note is inline when its home starts a home batch or continues the gathering
    /// batch's last run; a home anywhere else (free space in single blocks) gets its data written
    /// there at once, beside the note, instead of one more small home write later.
    #[test]
    fn inline_only_where_the_home_continues_the_batch() {
        let superblock = Superblock::with_regions(3, "inline", 1 << 20, 1024, 2 << 20);
        let mut copy = VolumeCopy::new(
            superblock.clone(),
            Recovered::empty(),
            Allocator::new(superblock.data_bytes),
            Durability::WriteBack,
        );
        copy.lone_writer = true;
        let request = block_request(IoKind::Write, 0, 7);
        let at = |address: u64| {
            [Piece {
                address,
                length: 4096,
            }]
        };
        assert_eq!(
            copy.inline_slots(&request, &at(40960), false, 1),
            Some(1),
            "no batch: this home starts one"
        );
        let mut buf = AlignedBuf::with_capacity(HOME_BATCH_BYTES);
        buf.set_len(4096);
        copy.homes.push_back(HomeBatch {
            id: 1,
            buf,
            runs: vec![HomeRun {
                address: 8192,
                length: 4096,
                at: 0,
            }],
            issued: false,
            next_run: 0,
            next_in_run: 0,
            writes_pending: 0,
            failed: false,
        });
        assert_eq!(copy.inline_slots(&request, &at(12288), false, 1), Some(1));
        assert_eq!(copy.inline_slots(&request, &at(40960), false, 1), None);
        assert_eq!(copy.inline_slots(&request, &at(4096), false, 1), None);
        // A batch being written takes no more homes: the next one starts anywhere.
        copy.homes[0].issued = true;
        assert_eq!(copy.inline_slots(&request, &at(40960), false, 1), Some(1));
        // Not a lone writer: never inline.
        copy.lone_writer = false;
        assert_eq!(copy.inline_slots(&request, &at(40960), false, 1), None);
    }
}
