//! What the micro-benchmarks share.

/// A small deterministic generator (splitmix64), so that every run measures the same sequence.
pub struct SplitMix(pub u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, bound)` (near enough for a benchmark).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}
