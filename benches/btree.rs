//! Extent map at scale: 1M extents from random 4 KiB writes over a 64 GiB volume.
//!
//! Measures point lookups, inserts (overwrites and fresh space), a catch-up scan of a small recent set,
//! and snapshot cost (the snapshot itself, and the copy-on-write path copy of the next insert).
//! Run briefly with: `cargo bench --bench btree -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferroblock::btree::{Extent, ExtentMap, Location};
use support::SplitMix;

mod support;

const VOLUME_BYTES: u64 = 64 << 30;
const WRITE_BYTES: u64 = 4096;
const EXTENT_COUNT_TARGET: usize = 1_000_000;
/// Extents written after the catch-up watermark.
const RECENT_EXTENT_COUNT: usize = 100;

/// The map under test plus what the benches need to keep writing into it.
struct Fixture {
    map: ExtentMap,
    /// Offsets known to hold an extent.
    written: Vec<u64>,
    next_op: u64,
    next_address: u64,
    random: SplitMix,
}

impl Fixture {
    fn build() -> Fixture {
        let mut fixture = Fixture {
            map: ExtentMap::new(),
            written: Vec::with_capacity(EXTENT_COUNT_TARGET),
            next_op: 1,
            next_address: 0,
            random: SplitMix(7),
        };
        let mut freed = Vec::new();
        let started = Instant::now();
        let mut inserts = 0u64;
        while fixture.map.extent_count() < EXTENT_COUNT_TARGET {
            let offset = fixture.random.below(VOLUME_BYTES / WRITE_BYTES) * WRITE_BYTES;
            fixture.write(offset, &mut freed);
            fixture.written.push(offset);
            freed.clear();
            inserts += 1;
        }
        let elapsed = started.elapsed();
        println!(
            "built {} extents with {inserts} random 4 KiB inserts in {:.2?}: {:.2} M inserts/s",
            fixture.map.extent_count(),
            elapsed,
            inserts as f64 / elapsed.as_secs_f64() / 1e6
        );
        fixture
    }

    fn write(&mut self, offset: u64, freed: &mut Vec<ferroblock::btree::Piece>) {
        let extent = Extent {
            offset,
            length: WRITE_BYTES,
            op: self.next_op,
            location: Location::Data(self.next_address),
        };
        self.next_op += 1;
        self.next_address += WRITE_BYTES;
        self.map.insert(extent, freed);
    }

    fn written_offset(&mut self) -> u64 {
        self.written[self.random.below(self.written.len() as u64) as usize]
    }
}

fn extent_map(c: &mut Criterion) {
    let mut fixture = Fixture::build();
    let mut group = c.benchmark_group("extent_map_1M");
    group.throughput(Throughput::Elements(1));

    let mut mappings = Vec::new();
    group.bench_function("lookup_4k_written", |b| {
        b.iter(|| {
            let offset = fixture.written_offset();
            mappings.clear();
            fixture
                .map
                .lookup(black_box(offset), WRITE_BYTES, &mut mappings);
            black_box(mappings.len())
        })
    });
    group.bench_function("lookup_128k_random", |b| {
        b.iter(|| {
            let offset = fixture.random.below(VOLUME_BYTES / WRITE_BYTES)
                * WRITE_BYTES.min(VOLUME_BYTES - (128 << 10));
            mappings.clear();
            fixture
                .map
                .lookup(black_box(offset), 128 << 10, &mut mappings);
            black_box(mappings.len())
        })
    });

    let mut freed = Vec::new();
    group.bench_function("insert_4k_overwrite", |b| {
        b.iter(|| {
            let offset = fixture.written_offset();
            freed.clear();
            fixture.write(black_box(offset), &mut freed);
        })
    });
    group.bench_function("insert_4k_random", |b| {
        b.iter(|| {
            let offset = fixture.random.below(VOLUME_BYTES / WRITE_BYTES) * WRITE_BYTES;
            freed.clear();
            fixture.write(black_box(offset), &mut freed);
        })
    });
    println!("map now holds {} extents", fixture.map.extent_count());

    // Catch-up: the extents written after watermark `since`.
    let since = fixture.next_op - 1;
    for _ in 0..RECENT_EXTENT_COUNT {
        let offset = fixture.random.below(VOLUME_BYTES / WRITE_BYTES) * WRITE_BYTES;
        freed.clear();
        fixture.write(offset, &mut freed);
    }
    let mut changed = Vec::new();
    group.bench_function("changed_since_100_recent", |b| {
        b.iter(|| {
            changed.clear();
            fixture.map.changed_since(black_box(since), &mut changed);
            black_box(changed.len())
        })
    });
    assert_eq!(changed.len(), RECENT_EXTENT_COUNT);

    group.bench_function("snapshot_and_drop", |b| {
        b.iter(|| drop(black_box(fixture.map.snapshot())))
    });
    group.bench_function("insert_4k_overwrite_after_snapshot", |b| {
        b.iter(|| {
            let snapshot = fixture.map.snapshot();
            let offset = fixture.written_offset();
            freed.clear();
            fixture.write(offset, &mut freed);
            snapshot
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // No plots: they need system fonts that a bare machine lacks (criterion panics without them).
    config = Criterion::default().without_plots();
    targets = extent_map
}
criterion_main!(benches);
