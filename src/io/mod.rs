//! Storage IO: where a volume's bytes live.
//!
//! Owns: aligned buffers, the per-reactor io_uring, and the stores (sparse memory, raw file or block
//! device). Must never: interpret protocol bytes, or be used from a thread other than the owning reactor.

pub mod buf;
pub mod device;
pub mod file;
pub mod memory;
pub mod uring;

pub use buf::AlignedBuf;
