//! The note log: how notes, commit watermarks and checkpoints are laid out on disk and read back.
//!
//! `superblock` is the static header of a backing store, `format` the journal block encoding, and
//! `recovery` the rules that rebuild the committed state after a crash. The runtime writer is
//! `volume::copy`, which owns the order in which these blocks are written.
//!
//! ```text
//! backing store (file or block device)
//! ┌──────────────┬──────────────────────────────────────┬───────────────────────────────────────┐
//! │ superblock   │ journal ring: 4 KiB blocks, seq % n  │ data area: note data, redirect-on-    │
//! │ (512 B, at 0)│ notes | checkpoint extents | done    │ write, allocated in 512 B sectors     │
//! └──────────────┴──────────────────────────────────────┴───────────────────────────────────────┘
//!  0              4 KiB                                  4 KiB + journal_bytes
//! ```

pub mod format;
pub mod recovery;
pub mod superblock;
