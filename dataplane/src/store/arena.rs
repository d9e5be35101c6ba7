//! The arena: one anonymous mapping per store holding every item byte.
//!
//! [`Arena::map`] tries, in order: 2 MiB hugepages (`MAP_HUGETLB`, needs pages reserved through
//! `/proc/sys/vm/nr_hugepages`), an ordinary mapping advised with `MADV_HUGEPAGE` (transparent huge
//! pages), and plain 4 KiB pages. Pages are touched lazily, so resident memory grows only as segments
//! are first written. Ordinary mappings are `MAP_NORESERVE`; the hugepage mapping is not, because
//! without a reservation a fault on an exhausted hugepage pool is a SIGBUS, while with one `mmap`
//! fails up front and we fall back. The rest of the store sees the arena as a byte slice;
//! this file holds the store's only `unsafe` code.

use super::{Backing, StoreError};
use std::ptr::NonNull;

const HUGE_PAGE_SIZE: usize = 2 << 20;

/// An owned anonymous mapping.
pub struct Arena {
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: the arena owns its mapping exclusively (like a `Box<[u8]>`); nothing else holds the pointer,
// so moving it to or sharing `&Arena` with another thread is as safe as for a boxed slice.
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` only hands out `&[u8]`, mutation needs `&mut Arena`.
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps `len` bytes (which must be nonzero), trying hugepages first when `try_hugepages`.
    pub fn map(len: usize, try_hugepages: bool) -> Result<Arena, StoreError> {
        assert!(len > 0, "an empty arena");
        if try_hugepages && len & (HUGE_PAGE_SIZE - 1) == 0 {
            if let Some(base) = mmap_anonymous(len, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB, false) {
                tracing::info!(bytes = len, backing = Backing::HugePages.name(), "item memory mapped");
                return Ok(Arena { base, len, backing: Backing::HugePages });
            }
        }
        let base = mmap_anonymous(len, 0, true)
            .ok_or_else(|| StoreError::Map { bytes: len, source: std::io::Error::last_os_error() })?;
        // SAFETY: `base..base+len` is the mapping just created; madvise only changes paging advice.
        let advised = unsafe { libc::madvise(base.as_ptr().cast(), len, libc::MADV_HUGEPAGE) } == 0;
        let backing = if advised { Backing::TransparentHugePages } else { Backing::SmallPages };
        tracing::info!(bytes = len, backing = backing.name(), "item memory mapped");
        Ok(Arena { base, len, backing })
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The whole arena.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes, zero-filled by the kernel, alive as long as
        // `self`; no `&mut` to it exists while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }

    /// The whole arena, writable.
    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` guarantees this is the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is our mapping and no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// A private anonymous mapping with `extra_flags` (and `MAP_NORESERVE` if `no_reserve`), or `None`
/// (errno set) on failure.
fn mmap_anonymous(len: usize, extra_flags: libc::c_int, no_reserve: bool) -> Option<NonNull<u8>> {
    let reserve = if no_reserve { libc::MAP_NORESERVE } else { 0 };
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | reserve | extra_flags;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if ptr == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(ptr.cast())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_writable_memory() {
        let mut arena = Arena::map(4 << 20, true).unwrap();
        assert_eq!(arena.len(), 4 << 20);
        assert!(arena.bytes().iter().step_by(4096).all(|&b| b == 0));
        arena.bytes_mut()[123] = 7;
        arena.bytes_mut()[(4 << 20) - 1] = 9;
        assert_eq!(arena.bytes()[123], 7);
        assert_eq!(arena.bytes()[(4 << 20) - 1], 9);
    }

    #[test]
    fn odd_sizes_fall_back_from_hugetlb() {
        let arena = Arena::map(3 << 20, true).unwrap();
        assert_ne!(arena.backing(), Backing::HugePages);
    }
}
