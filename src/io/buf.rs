//! Page-aligned IO buffers.
//!
//! Owns: the heap memory that carries request data from the socket to the store and back. Buffers are
//! aligned to 4 KiB so that they can be handed to the kernel with O_DIRECT. Must never: be freed or
//! resized while the kernel owns them (the owner of an `AlignedBuf` moves it into the in-flight table
//! before submission and gets it back at completion).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every IO buffer: the largest logical block size O_DIRECT asks for in practice.
pub const IO_ALIGNMENT: usize = 4096;

/// An owned, page-aligned byte buffer with a length and a capacity, like a `Vec<u8>` that never moves
/// its bytes to a less aligned place.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Vec<u8>`); moving it to another thread moves
// that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer that owns no memory yet.
    pub const fn empty() -> AlignedBuf {
        AlignedBuf {
            ptr: NonNull::dangling(),
            len: 0,
            capacity: 0,
        }
    }

    /// A zero-length buffer able to hold `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::empty();
        buf.reserve_total(capacity);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes the capacity at least `capacity` bytes. Contents are not preserved when it grows: callers
    /// size a buffer before filling it, never after.
    pub fn reserve_total(&mut self, capacity: usize) {
        if capacity <= self.capacity {
            return;
        }
        self.release();
        let rounded = capacity.next_multiple_of(IO_ALIGNMENT);
        let layout = Layout::from_size_align(rounded, IO_ALIGNMENT).expect("IO buffer layout");
        // SAFETY: the layout has a non-zero size (capacity > self.capacity >= 0, rounded up to 4 KiB).
        // Zeroed once at allocation, so every byte a slice can expose is initialised; buffers are reused,
        // so this is not a per-IO cost.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        self.ptr = ptr;
        self.capacity = rounded;
    }

    /// Sets the length (the bytes up to it are considered meaningful). Newly exposed bytes hold whatever
    /// the buffer held before: callers overwrite them.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "IO buffer length {len} over capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// Frees the memory, leaving an empty buffer.
    pub fn release(&mut self) {
        if self.capacity > 0 {
            let layout =
                Layout::from_size_align(self.capacity, IO_ALIGNMENT).expect("IO buffer layout");
            // SAFETY: `ptr` was allocated by `alloc` with exactly this layout and is not used afterwards.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
        // Field by field: assigning a whole `AlignedBuf` would drop the old one and recurse.
        self.ptr = NonNull::dangling();
        self.len = 0;
        self.capacity = 0;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `capacity >= len` bytes (or dangling with len 0) and every byte was
        // initialised by `alloc_zeroed` or a later write.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for handing the buffer to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AlignedBuf(len {}, capacity {})",
            self.len, self.capacity
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        let mut buf = AlignedBuf::with_capacity(100);
        assert_eq!(buf.capacity(), IO_ALIGNMENT);
        assert_eq!(buf.as_mut_ptr() as usize % IO_ALIGNMENT, 0);
        buf.set_len(100);
        buf.as_mut_slice().fill(7);
        assert!(buf.as_slice().iter().all(|&b| b == 7));
        buf.reserve_total(10_000);
        assert_eq!(buf.capacity(), 12_288);
        assert_eq!(buf.len(), 0);
    }
}
