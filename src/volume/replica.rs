//! A volume as its replication peer sees it: `VolumeReplica` lends a `Volume`, with its reactor's ring
//! and completion queue, to the replication hub for one call (`replication::hub::ReplicaStore`).
//!
//! Owns nothing. Must never: be held across reactor iterations, or reach a store other than a
//! persistent copy (only those replicate: the server refuses other backends in a cluster).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use crate::io::device::UringDevice;
use crate::io::uring::Uring;
use crate::replication::hub::{CatchUpItem, ReplicaStore};
use crate::replication::message::NoteMessage;
use crate::volume::{IoCompletion, ServingGate, Store, Volume};

pub struct VolumeReplica<'a> {
    pub volume: &'a mut Volume,
    pub uring: &'a mut Uring,
    pub done: &'a mut VecDeque<IoCompletion>,
}

impl Volume {
    /// Makes the volume serve only what its replication peer allows (from now on).
    pub fn set_gate(&mut self, gate: ServingGate) {
        self.gate = Some(gate);
    }

    pub fn is_persistent(&self) -> bool {
        matches!(self.store, Store::Persistent { .. })
    }
}

impl VolumeReplica<'_> {
    /// Runs `f` on the persistent copy with a device for this reactor's ring.
    fn with_copy<R>(
        &mut self,
        f: impl FnOnce(
            &mut crate::volume::copy::VolumeCopy,
            &mut UringDevice<'_>,
            &mut VecDeque<IoCompletion>,
        ) -> R,
    ) -> R {
        let id = self.volume.id;
        let Store::Persistent { copy, file } = &mut self.volume.store else {
            panic!("only persistent copies replicate");
        };
        let mut device = UringDevice {
            uring: self.uring,
            fd: file.as_raw_fd(),
            volume: id,
        };
        f(copy, &mut device, self.done)
    }
}

impl ReplicaStore for VolumeReplica<'_> {
    fn committed_op(&self) -> u64 {
        match &self.volume.store {
            Store::Persistent { copy, .. } => copy.committed_op(),
            _ => 0,
        }
    }

    fn take_created_notes(&mut self, out: &mut Vec<NoteMessage>) {
        self.with_copy(|copy, _, _| copy.take_created_notes(out));
    }

    fn set_commit_limit(&mut self, through: u64) {
        self.with_copy(|copy, device, done| copy.set_commit_limit(through, device, done));
    }

    fn apply_note(&mut self, note: NoteMessage) {
        self.with_copy(|copy, device, done| {
            if let Err(error) = copy.apply_note(note, device, done) {
                tracing::error!(%error, "cannot apply a replicated note");
            }
        });
    }

    fn discard_uncommitted(&mut self) {
        self.with_copy(|copy, device, done| copy.discard_uncommitted(device, done));
    }

    fn start_catch_up_source(&mut self, id: u64, base: u64) -> u64 {
        self.with_copy(|copy, _, _| copy.start_catch_up_source(id, base))
    }

    fn poll_catch_up_source(&mut self, id: u64, out: &mut Vec<CatchUpItem>, budget_bytes: usize) {
        self.with_copy(|copy, device, done| {
            copy.poll_catch_up_source(id, out, budget_bytes, device, done)
        });
    }

    fn stop_catch_up_source(&mut self, id: u64) {
        self.with_copy(|copy, _, _| copy.stop_catch_up_source(id));
    }

    fn catch_up_source_failed(&self, id: u64) -> bool {
        match &self.volume.store {
            Store::Persistent { copy, .. } => copy.catch_up_source_error(id).is_some(),
            _ => false,
        }
    }

    fn apply_catch_up_extent(&mut self, extent: NoteMessage) {
        self.with_copy(|copy, device, done| {
            if let Err(error) = copy.apply_catch_up(extent, device, done) {
                tracing::error!(%error, "cannot apply a catch-up item");
            }
        });
    }

    fn finish_catch_up(&mut self, through: u64) {
        self.with_copy(|copy, device, done| copy.finish_catch_up(through, device, done));
    }

    fn set_serving(&mut self, writes: bool, reads: bool) {
        self.volume.set_gate(ServingGate { writes, reads });
    }

    fn reset_when_idle(&mut self) -> std::io::Result<Option<u64>> {
        let Store::Persistent { copy, file } = &mut self.volume.store else {
            panic!("only persistent copies replicate");
        };
        if !copy.is_idle() {
            return Ok(None);
        }
        crate::volume::open::reset_copy(file, copy)?;
        Ok(Some(copy.committed_op()))
    }
}
