//! Memory-allocator tuning for long CPU workloads (training, many encodes in one process).
//!
//! Every training step allocates and frees the same large tensors. glibc's `malloc` serves
//! blocks above its mmap threshold (128 KiB at first) with fresh `mmap`s and unmaps them on
//! free, so each step faults every page of every large tensor in again: about 15% of a
//! training step's time here. Raising the thresholds keeps freed blocks in the heap for the
//! next step: the N128/M192 training-step bench (`cargo bench --bench codec -- train_step`,
//! which calls [`reuse_freed_memory`]) took 2.43 s [2.33–2.56] per step on the 2-core
//! development machine, against 3.14 s [3.07–3.21] without it, measured back to back. The
//! environment variables `MALLOC_MMAP_THRESHOLD_=33554432` and
//! `MALLOC_TRIM_THRESHOLD_=4294967296` have the same effect. The price is a process that keeps
//! up to the trim threshold of freed memory.

/// Largest mmap threshold glibc accepts on 64-bit targets (32 MiB): blocks up to this size
/// are served from, and returned to, the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Freed memory at the top of the heap kept before it is given back to the kernel (1 GiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1 << 30;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
}

/// Asks the allocator to keep freed tensor buffers for reuse instead of returning them to the
/// kernel (see the module docs). Call it once, early, in a program that trains or encodes many
/// images; the `psic` CLI does for `train` and `bench`. Returns whether the settings took
/// effect: `true` on glibc Linux, `false` (nothing changed) elsewhere.
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3.
        // SAFETY: mallopt only changes allocator parameters; both values are in its range.
        unsafe { mallopt(-3, MMAP_THRESHOLD) == 1 && mallopt(-1, TRIM_THRESHOLD) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Buffers from this size up ask the kernel for transparent huge pages.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

#[cfg(target_os = "linux")]
extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
}

/// Marks the whole pages inside `[ptr, ptr + len)` `MADV_HUGEPAGE` (Linux; elsewhere nothing).
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *const u8, len: usize) {
    const MADV_HUGEPAGE: i32 = 14;
    const PAGE: usize = 4096;
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len) & !(PAGE - 1);
    if end > start {
        // SAFETY: the range lies inside one live allocation and is page-aligned; MADV_HUGEPAGE
        // only changes how its pages are backed, never their contents. A kernel without
        // transparent huge pages refuses it, which changes nothing.
        unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
    }
}

/// A global allocator that asks for transparent huge pages for every block of 4 MiB or more
/// and is the system allocator otherwise: install it in a program that encodes or trains, with
///
/// ```
/// #[global_allocator]
/// static ALLOC: psic::alloc::HugePages = psic::alloc::HugePages;
/// ```
///
/// candle allocates a fresh buffer for every tensor, and large ones come straight from `mmap`,
/// so each first write faults 4 KiB pages in one by one. Four training steps of the N128/M192
/// bench model (`examples/train_profile.rs`, with `reuse_freed_memory`) faulted 1.06 M pages
/// with the system allocator before psic's own im2col buffers were advised, 0.93–0.94 M after;
/// with this allocator installed (and transparent huge pages in the kernel's `madvise` or
/// `always` mode) 0.11 M, and the run took 4–5% less CPU time than the first (2 runs each,
/// alternating, on a loaded 2-core machine). glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` does the same for
/// every block without code (9 k faults, 1–9% less CPU time in 3 alternating runs).
///
/// It also keeps up to 16 freed blocks of 4 MiB or more (256 MiB in all, the oldest returned
/// first) and hands one out again for the next allocation of exactly its size and alignment:
/// repeated encodes and training steps allocate the same large tensors each time, and a kept
/// block needs no `mmap`, no page faults and no zeroing by the kernel (a zeroed allocation
/// gets a `memset` instead). Eleven 768x512 encodes with the fixture model spent 0.30 s in the
/// kernel instead of 0.79 s. The price is memory: the CLI's peak RSS for one 768x512 encode
/// rose from 195 MB to 256 MB (decode: 140 to 168 MB). The `psic` CLI and the benches install
/// this allocator.
#[derive(Debug, Clone, Copy, Default)]
pub struct HugePages;

/// `block` (of `size` bytes, possibly null) after advising huge pages for it if it is large.
#[inline]
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn advise_large(block: *mut u8, size: usize) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if !block.is_null() && size >= HUGE_PAGE_MIN_BYTES {
        advise_huge_pages(block, size);
    }
    block
}

/// Freed blocks of at least [`HUGE_PAGE_MIN_BYTES`] that [`HugePages`] keeps for the next
/// allocation of exactly the same size: repeated encodes and training steps allocate the same
/// large tensors every time, and a kept block skips the `mmap`, the page faults and the
/// kernel's zeroing of every page (and `munmap` on free). At most this many blocks...
const CACHE_SLOTS: usize = 16;
/// ...and this many bytes in all (the oldest block is returned to the system first).
const CACHE_MAX_BYTES: usize = 256 << 20;

/// A kept block: address, size and alignment (address 0 marks a free slot).
#[derive(Clone, Copy)]
struct Kept {
    addr: usize,
    size: usize,
    align: usize,
    /// Insertion order, for evicting the oldest.
    stamp: u64,
}

struct BlockCache {
    slots: [Kept; CACHE_SLOTS],
    bytes: usize,
    clock: u64,
}

static CACHE: std::sync::Mutex<BlockCache> = std::sync::Mutex::new(BlockCache {
    slots: [Kept {
        addr: 0,
        size: 0,
        align: 0,
        stamp: 0,
    }; CACHE_SLOTS],
    bytes: 0,
    clock: 0,
});

fn cache() -> std::sync::MutexGuard<'static, BlockCache> {
    // The cache holds plain numbers, valid even if a holder panicked.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlockCache {
    /// Removes and returns a kept block of exactly this size and alignment.
    fn take(&mut self, layout: std::alloc::Layout) -> Option<*mut u8> {
        let slot = self
            .slots
            .iter_mut()
            .find(|k| k.addr != 0 && k.size == layout.size() && k.align == layout.align())?;
        let addr = std::mem::replace(&mut slot.addr, 0);
        self.bytes -= layout.size();
        Some(addr as *mut u8)
    }

    /// Keeps a freed block, first returning the oldest ones to the system while the cache is
    /// over its limits. Returns false (the caller frees it) for a block larger than the limit.
    ///
    /// # Safety
    /// `ptr` must be a block of `layout` from `System`, no longer used by anyone.
    unsafe fn keep(&mut self, ptr: *mut u8, layout: std::alloc::Layout) -> bool {
        if layout.size() > CACHE_MAX_BYTES {
            return false;
        }
        loop {
            let free = self.slots.iter().position(|k| k.addr == 0);
            if let Some(i) = free.filter(|_| self.bytes + layout.size() <= CACHE_MAX_BYTES) {
                self.clock += 1;
                self.slots[i] = Kept {
                    addr: ptr as usize,
                    size: layout.size(),
                    align: layout.align(),
                    stamp: self.clock,
                };
                self.bytes += layout.size();
                return true;
            }
            // Full: return the oldest kept block to the system.
            let Some(oldest) = self
                .slots
                .iter_mut()
                .filter(|k| k.addr != 0)
                .min_by_key(|k| k.stamp)
            else {
                return false;
            };
            let old = std::mem::replace(&mut oldest.addr, 0);
            let (size, align) = (oldest.size, oldest.align);
            self.bytes -= size;
            // SAFETY: a kept block is a System block of this (valid) layout that nobody uses.
            std::alloc::GlobalAlloc::dealloc(
                &std::alloc::System,
                old as *mut u8,
                std::alloc::Layout::from_size_align_unchecked(size, align),
            );
        }
    }
}

// SAFETY: blocks come from `System` and go back to it, either at once or after waiting in the
// cache of freed blocks, where nobody else holds them; the advice only touches whole pages
// inside a block just returned.
unsafe impl std::alloc::GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= HUGE_PAGE_MIN_BYTES {
            if let Some(p) = cache().take(layout) {
                return p;
            }
        }
        advise_large(std::alloc::System.alloc(layout), layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= HUGE_PAGE_MIN_BYTES {
            if let Some(p) = cache().take(layout) {
                std::ptr::write_bytes(p, 0, layout.size());
                return p;
            }
        }
        // Zeroed blocks this large are fresh mappings whose pages are not touched yet, so the
        // advice still applies to all of them.
        advise_large(std::alloc::System.alloc_zeroed(layout), layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if layout.size() >= HUGE_PAGE_MIN_BYTES && cache().keep(ptr, layout) {
            return;
        }
        std::alloc::System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        advise_large(std::alloc::System.realloc(ptr, layout, new_size), new_size)
    }
}

/// A zeroed `f32` buffer of `len` elements for a large activation. Blocks this large usually
/// come straight from `mmap`, and writing them first faults every 4 KiB page in: about 10% of a
/// 768x512 encode went to page faults and unmapping. From 4 MiB up the buffer's pages are
/// marked `MADV_HUGEPAGE` before they are touched, so on Linux with transparent huge pages in
/// `madvise` (or `always`) mode they fault in 2 MiB at a time. Elsewhere it is `vec![0.0; len]`.
pub(crate) fn zeroed_f32(len: usize) -> Vec<f32> {
    let v = vec![0f32; len];
    advise_large(v.as_ptr().cast_mut().cast(), len * 4);
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn takes_effect_on_glibc_linux() {
        let applied = super::reuse_freed_memory();
        assert_eq!(
            applied,
            cfg!(all(target_os = "linux", target_env = "gnu")),
            "mallopt refused the settings"
        );
        // Allocation still works afterwards, large and small.
        let big = vec![1f32; 10 << 20];
        assert_eq!(big.iter().sum::<f32>(), (10 << 20) as f32);
    }

    #[test]
    fn huge_page_allocator_keeps_contents() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = super::HugePages;
        for size in [1usize, 4096, 5 << 20, 9 << 20] {
            let layout = Layout::from_size_align(size, 16).unwrap();
            // SAFETY: sizes are non-zero; every block is written within its size and freed once.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null());
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                a.dealloc(z, layout);
                let p = a.alloc(layout);
                assert!(!p.is_null());
                std::ptr::write_bytes(p, 7, size);
                let grown = a.realloc(p, layout, 2 * size);
                assert!(!grown.is_null());
                assert!(std::slice::from_raw_parts(grown, size)
                    .iter()
                    .all(|&b| b == 7));
                a.dealloc(grown, Layout::from_size_align(2 * size, 16).unwrap());
            }
        }
    }

    #[test]
    fn kept_blocks_are_reused_zeroed_and_bounded() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = super::HugePages;
        // An odd size no other test uses, so that the block found again is this one.
        let layout = Layout::from_size_align((6 << 20) + 4096 * 3, 64).unwrap();
        // SAFETY: blocks are used within their layout and freed once, with that layout.
        unsafe {
            let p = a.alloc_zeroed(layout);
            std::ptr::write_bytes(p, 7, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(p, q, "a freed block of the same size is handed out again");
            assert!(std::slice::from_raw_parts(q, layout.size())
                .iter()
                .all(|&b| b == 0));
            a.dealloc(q, layout);
            // Many more (and larger) blocks than the cache keeps: the oldest go back to the
            // system and the cache stays within its byte limit.
            let sizes: Vec<usize> = (0..40).map(|i| (5 << 20) + i * 4096 * 7).collect();
            let blocks: Vec<_> = sizes
                .iter()
                .map(|&n| {
                    let l = Layout::from_size_align(n, 16).unwrap();
                    let b = a.alloc(l);
                    std::ptr::write_bytes(b, 1, n);
                    (b, l)
                })
                .collect();
            for (b, l) in blocks {
                a.dealloc(b, l);
            }
            let kept = super::cache().bytes;
            assert!(kept <= super::CACHE_MAX_BYTES, "{kept} bytes kept");
        }
    }

    #[test]
    fn zeroed_buffers_of_every_size() {
        for len in [0, 1, 1000, 1 << 20, (5 << 20) + 3] {
            let mut v = super::zeroed_f32(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
            v.iter_mut().for_each(|x| *x = 2.0);
            assert_eq!(v.iter().sum::<f32>(), 2.0 * len as f32);
        }
    }
}
