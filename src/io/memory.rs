//! Sparse in-memory store (like SPDK's malloc bdev, but sparse): for measuring pure protocol and reactor
//! overhead, and for tests.
//!
//! Owns: 4 KiB pages, allocated on first write, freed when a trim or write-zeroes covers a whole page.
//! Unwritten space reads as zeros and reports as a hole. Must never: be touched by any thread but the
//! owning reactor (no locks).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::io::AlignedBuf;
use crate::volume::{
    EXTENT_HOLE, EXTENT_ZERO, EXTENTS_PER_REPLY_MAX, IoCompletion, IoFlags, IoKind, IoRequest,
    push_extent,
};

pub const PAGE_SIZE: usize = 4096;
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
/// Freed pages kept for reuse, so that a trim/write cycle does not go through the allocator each time.
const FREE_PAGES_KEPT_MAX: usize = 4096;
/// Bytes one block-status answer scans at most; the client asks again for the rest.
const BLOCK_STATUS_SCAN_BYTES_MAX: u64 = 1 << 30;

type Page = Box<[u8; PAGE_SIZE]>;

/// Page numbers are already well spread; a multiplicative hash is enough and much cheaper than SipHash.
#[derive(Default)]
struct PageNumberHasher(u64);

impl Hasher for PageNumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub struct MemoryStore {
    pages: HashMap<u64, Page, BuildHasherDefault<PageNumberHasher>>,
    free_pages: Vec<Page>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            pages: HashMap::default(),
            free_pages: Vec::new(),
        }
    }

    /// Pages currently holding data (what the store costs in memory, in pages).
    pub fn allocated_pages(&self) -> usize {
        self.pages.len()
    }

    pub fn execute(&mut self, mut request: IoRequest) -> IoCompletion {
        let offset = request.offset;
        let length = u64::from(request.length);
        let result = match request.kind {
            IoKind::Read => {
                self.read(offset, request.buf.as_mut_slice());
                Ok(request.length)
            }
            IoKind::Write => {
                self.write(offset, request.buf.as_slice());
                Ok(request.length)
            }
            IoKind::Trim => {
                self.zero(offset, length, false);
                Ok(request.length)
            }
            IoKind::WriteZeroes => {
                self.zero(offset, length, request.flags.contains(IoFlags::NO_HOLE));
                Ok(request.length)
            }
            // Memory is as durable as it gets and always cached.
            IoKind::Flush | IoKind::Cache => Ok(request.length),
            IoKind::BlockStatus => Ok(self.block_status(
                offset,
                length,
                request.flags.contains(IoFlags::ONE_EXTENT),
                &mut request.buf,
            )),
        };
        IoCompletion {
            origin: request.origin,
            result,
            buf: request.buf,
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        let mut done = 0usize;
        while done < out.len() {
            let position = offset + done as u64;
            let page_number = position / PAGE_SIZE_U64;
            let in_page = (position % PAGE_SIZE_U64) as usize;
            let chunk = (PAGE_SIZE - in_page).min(out.len() - done);
            let target = &mut out[done..done + chunk];
            match self.pages.get(&page_number) {
                Some(page) => target.copy_from_slice(&page[in_page..in_page + chunk]),
                None => target.fill(0),
            }
            done += chunk;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let position = offset + done as u64;
            let page_number = position / PAGE_SIZE_U64;
            let in_page = (position % PAGE_SIZE_U64) as usize;
            let chunk = (PAGE_SIZE - in_page).min(data.len() - done);
            let page = self.page_mut(page_number);
            page[in_page..in_page + chunk].copy_from_slice(&data[done..done + chunk]);
            done += chunk;
        }
    }

    /// Zeroes a range: whole pages are freed (or, with `keep_allocated`, zeroed in place).
    fn zero(&mut self, offset: u64, length: u64, keep_allocated: bool) {
        let end = offset + length;
        let mut position = offset;
        while position < end {
            let page_number = position / PAGE_SIZE_U64;
            let in_page = (position % PAGE_SIZE_U64) as usize;
            let chunk = (PAGE_SIZE - in_page).min((end - position) as usize);
            let whole_page = chunk == PAGE_SIZE;
            if whole_page && !keep_allocated {
                if let Some(page) = self.pages.remove(&page_number) {
                    self.recycle(page);
                }
            } else if keep_allocated {
                self.page_mut(page_number)[in_page..in_page + chunk].fill(0);
            } else if let Some(page) = self.pages.get_mut(&page_number) {
                page[in_page..in_page + chunk].fill(0);
            }
            position += chunk as u64;
        }
    }

    fn block_status(
        &self,
        offset: u64,
        length: u64,
        one_extent: bool,
        buf: &mut AlignedBuf,
    ) -> u32 {
        let extents_max = if one_extent { 1 } else { EXTENTS_PER_REPLY_MAX };
        buf.set_len(extents_max * crate::volume::EXTENT_RECORD_LEN);
        let end = offset + length.min(BLOCK_STATUS_SCAN_BYTES_MAX);
        let mut count = 0u32;
        let mut position = offset;
        while position < end {
            let page_number = position / PAGE_SIZE_U64;
            let chunk = ((page_number + 1) * PAGE_SIZE_U64).min(end) - position;
            let flags = if self.pages.contains_key(&page_number) {
                0
            } else {
                EXTENT_HOLE | EXTENT_ZERO
            };
            if !push_extent(buf, &mut count, chunk, flags) {
                break;
            }
            if one_extent && count == 1 && position + chunk < end {
                // One extent is enough but it may still grow: keep merging while the flags match.
                let next_page = page_number + 1;
                let next_flags = if self.pages.contains_key(&next_page) {
                    0
                } else {
                    EXTENT_HOLE | EXTENT_ZERO
                };
                if next_flags != flags {
                    break;
                }
            }
            position += chunk;
        }
        count
    }

    fn page_mut(&mut self, page_number: u64) -> &mut [u8; PAGE_SIZE] {
        let free_pages = &mut self.free_pages;
        self.pages
            .entry(page_number)
            .or_insert_with(|| match free_pages.pop() {
                Some(mut page) => {
                    page.fill(0);
                    page
                }
                None => Box::new([0u8; PAGE_SIZE]),
            })
    }

    fn recycle(&mut self, page: Page) {
        if self.free_pages.len() < FREE_PAGES_KEPT_MAX {
            self.free_pages.push(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{EXTENT_RECORD_LEN, Origin};

    fn request(kind: IoKind, offset: u64, length: u32, fill: u8) -> IoRequest {
        let mut buf = AlignedBuf::with_capacity(length.max(1) as usize * 2);
        buf.set_len(length as usize);
        buf.as_mut_slice().fill(fill);
        IoRequest {
            volume: 0,
            kind,
            flags: IoFlags::empty(),
            offset,
            length,
            buf,
            origin: Origin {
                reactor: 0,
                slot: 0,
                connection: 0,
                generation: 0,
            },
        }
    }

    fn extents(completion: &IoCompletion) -> Vec<(u32, u32)> {
        let count = *completion.result.as_ref().expect("block status") as usize;
        completion.buf.as_slice()[..count * EXTENT_RECORD_LEN]
            .chunks(EXTENT_RECORD_LEN)
            .map(|r| {
                (
                    u32::from_ne_bytes(r[0..4].try_into().unwrap()),
                    u32::from_ne_bytes(r[4..8].try_into().unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn sparse_terabyte_costs_only_written_pages() {
        let mut store = MemoryStore::new();
        let terabyte = 1u64 << 40;
        store.execute(request(IoKind::Write, terabyte - 8192, 8192, 0xab));
        assert_eq!(store.allocated_pages(), 2);
        let read = store.execute(request(IoKind::Read, terabyte - 12288, 12288, 0xff));
        assert!(read.buf.as_slice()[..4096].iter().all(|&b| b == 0));
        assert!(read.buf.as_slice()[4096..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn unaligned_write_and_partial_trim() {
        let mut store = MemoryStore::new();
        store.execute(request(IoKind::Write, 512, 8192, 1));
        store.execute(request(IoKind::Trim, 1024, 512, 0));
        let read = store.execute(request(IoKind::Read, 0, 12288, 9));
        let bytes = read.buf.as_slice();
        assert!(bytes[..512].iter().all(|&b| b == 0));
        assert!(bytes[512..1024].iter().all(|&b| b == 1));
        assert!(bytes[1024..1536].iter().all(|&b| b == 0));
        assert!(bytes[1536..8704].iter().all(|&b| b == 1));
        assert!(bytes[8704..].iter().all(|&b| b == 0));
    }

    #[test]
    fn trim_frees_whole_pages_and_block_status_shows_holes() {
        let mut store = MemoryStore::new();
        store.execute(request(IoKind::Write, 0, 16384, 3));
        store.execute(request(IoKind::Trim, 4096, 8192, 0));
        assert_eq!(store.allocated_pages(), 2);
        let status = store.execute(request(IoKind::BlockStatus, 0, 65536, 0));
        assert_eq!(
            extents(&status),
            vec![(4096, 0), (8192, 3), (4096, 0), (49152, 3)]
        );
        let mut one = request(IoKind::BlockStatus, 4096, 65536 - 4096, 0);
        one.flags = IoFlags::ONE_EXTENT;
        assert_eq!(extents(&store.execute(one)), vec![(8192, 3)]);
    }

    #[test]
    fn write_zeroes_no_hole_keeps_pages() {
        let mut store = MemoryStore::new();
        store.execute(request(IoKind::Write, 0, 8192, 5));
        let mut zero = request(IoKind::WriteZeroes, 0, 8192, 0);
        zero.flags = IoFlags::NO_HOLE;
        store.execute(zero);
        assert_eq!(store.allocated_pages(), 2);
        store.execute(request(IoKind::WriteZeroes, 0, 8192, 0));
        assert_eq!(store.allocated_pages(), 0);
        let read = store.execute(request(IoKind::Read, 0, 8192, 9));
        assert!(read.buf.as_slice().iter().all(|&b| b == 0));
    }
}
