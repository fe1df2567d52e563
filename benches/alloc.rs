//! Data-area allocator in the steady state of an overwritten volume: every write allocates new space
//! and frees the space of the data it replaces, as a commit does.
//!
//! The volume is 1 GiB with the data area `data_bytes_for` gives it (64 MiB spare), written whole once,
//! then overwritten at random: the free space ends up scattered over the whole area in pieces of the
//! write size, which is where the allocator's index is largest.
//! Run briefly with: `cargo bench --bench alloc -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferroblock::alloc::{Allocator, Piece};
use ferroblock::journal::superblock::data_bytes_for;
use support::SplitMix;

mod support;

const VOLUME_BYTES: u64 = 1 << 30;

/// A volume of `block`-sized slots, each holding the pieces its last write was given.
struct Overwrites {
    allocator: Allocator,
    slots: Vec<Vec<Piece>>,
    block: u64,
    random: SplitMix,
    /// The piece list of the slot overwritten last, reused for the next write's pieces.
    spare: Vec<Piece>,
}

impl Overwrites {
    /// Writes the whole volume once, then overwrites it at random `warm_up_rounds` times over.
    fn build(block: u64, warm_up_rounds: u64) -> Overwrites {
        let mut allocator = Allocator::new(data_bytes_for(VOLUME_BYTES, None).expect("fits"));
        let slot_count = (VOLUME_BYTES / block) as usize;
        let slots = (0..slot_count)
            .map(|_| {
                let mut pieces = Vec::new();
                allocator.allocate(block, &mut pieces).expect("space");
                pieces
            })
            .collect();
        let mut overwrites = Overwrites {
            allocator,
            slots,
            block,
            random: SplitMix(11),
            spare: Vec::new(),
        };
        for _ in 0..warm_up_rounds * slot_count as u64 {
            overwrites.overwrite_one();
        }
        overwrites
    }

    /// One random overwrite: new space for the slot, then the old space freed.
    fn overwrite_one(&mut self) {
        let slot = self.random.below(self.slots.len() as u64) as usize;
        let mut pieces = std::mem::take(&mut self.spare);
        pieces.clear();
        self.allocator
            .allocate(self.block, &mut pieces)
            .expect("the spare space holds a write");
        let replaced = std::mem::replace(&mut self.slots[slot], pieces);
        for &piece in &replaced {
            self.allocator.free(piece);
        }
        self.spare = replaced;
    }
}

fn steady_state(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc_overwrite");
    group.throughput(Throughput::Elements(1));
    for block in [4096u64, 128 << 10] {
        let mut overwrites = Overwrites::build(block, 2);
        group.bench_function(format!("{}k", block >> 10), |b| {
            b.iter(|| {
                overwrites.overwrite_one();
                black_box(overwrites.allocator.free_bytes())
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // No plots: they need system fonts that a bare machine lacks (criterion panics without them).
    config = Criterion::default().without_plots();
    targets = steady_state
}
criterion_main!(benches);
