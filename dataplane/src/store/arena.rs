//! The arena: one mapping per store holding every item byte, anonymous or (for a restartable cache) a
//! shared mapping of a file.
//!
//! [`Arena::map`] tries, in order: 2 MiB hugepages (`MAP_HUGETLB`, needs pages reserved through
//! `/proc/sys/vm/nr_hugepages`), an ordinary mapping advised with `MADV_HUGEPAGE` (transparent huge
//! pages), and plain 4 KiB pages. Pages are touched lazily, so resident memory grows only as segments
//! are first written. Ordinary mappings are `MAP_NORESERVE`; the hugepage mapping is not, because
//! without a reservation a fault on an exhausted hugepage pool is a SIGBUS, while with one `mmap`
//! fails up front and we fall back.
//!
//! [`Arena::map_file`] maps a file `MAP_SHARED` instead (memcached's `-e`): its pages belong to the
//! file, so they outlive the process (a kill -9 included) and a restarted store finds its items again.
//! The file starts with a metadata area ([`Region`]s the store lays out in `persist`), then the
//! segments. On hugetlbfs the mapping reserves its huge pages up front (mmap fails rather than a later
//! fault); on tmpfs or another file system the blocks are allocated up front for the same reason (a fault
//! on a full tmpfs is a SIGBUS).
//!
//! The rest of the store sees the arena as a byte slice and the metadata as [`Region`]s;
//! this file holds the store's only `unsafe` code.

use super::{Backing, StoreError};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, Ordering};

pub const HUGE_PAGE_SIZE: usize = 2 << 20;
/// `statfs(2)`'s f_type of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// An owned mapping: the items' bytes, after `offset` bytes of file metadata when mapped from a file.
pub struct Arena {
    /// The start of the whole mapping (the metadata area of a file mapping).
    map_base: NonNull<u8>,
    map_len: usize,
    /// The items' bytes: `map_base + offset`, `len` long.
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
    /// A memory file, held open and locked (`flock`) so that no second process maps it meanwhile.
    _file: Option<std::fs::File>,
}

/// A mapped file, as [`Arena::map_file`] opened it.
pub struct FileArena {
    pub arena: Arena,
    /// The file's metadata area, cut into the two disjoint regions the store asked for.
    pub header: Region,
    pub table: Region,
    /// The file already had exactly this size: its contents may be a previous run's.
    pub reused: bool,
}

/// A piece of a file mapping's metadata area, written field by field. Every write is ordered after
/// every store the program made before it (a compiler fence; x86 keeps stores in order), so a process
/// killed at any instruction leaves in the file a prefix of its writes, in program order.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a region is a range of a mapping owned by the store's arena, disjoint from every other region
// and from the items' bytes; like the arena it is used only through its owner (`&mut` to write).
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only reads.
unsafe impl Sync for Region {}

impl Region {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Copies `out.len()` bytes from `at`.
    pub fn read(&self, at: usize, out: &mut [u8]) {
        assert!(at + out.len() <= self.len, "a read past the region");
        // SAFETY: in bounds (checked above) of a live mapping that nothing else writes while `&self`.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(at), out.as_mut_ptr(), out.len()) }
    }

    /// Writes `bytes` at `at`, after every earlier store of the program (see the type's docs).
    pub fn write(&mut self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= self.len, "a write past the region");
        #[cfg(test)]
        super::persist::checkpoints::hit();
        compiler_fence(Ordering::SeqCst);
        // SAFETY: in bounds (checked above) of a live mapping this region alone writes (`&mut self`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(at), bytes.len()) }
        compiler_fence(Ordering::SeqCst);
    }

    /// An aligned 8-byte field written with one store, so a kill leaves the old value or the new one.
    pub fn write_u64(&mut self, at: usize, value: u64) {
        assert!(at + 8 <= self.len && (self.base.as_ptr() as usize + at).is_multiple_of(8), "an unaligned field");
        #[cfg(test)]
        super::persist::checkpoints::hit();
        compiler_fence(Ordering::SeqCst);
        // SAFETY: in bounds and aligned (checked above); this region alone writes it (`&mut self`).
        unsafe { std::ptr::write_volatile(self.base.as_ptr().add(at).cast::<u64>(), value.to_le()) }
        compiler_fence(Ordering::SeqCst);
    }

    pub fn read_u64(&self, at: usize) -> u64 {
        let mut bytes = [0; 8];
        self.read(at, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    pub fn read_u32(&self, at: usize) -> u32 {
        let mut bytes = [0; 4];
        self.read(at, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    pub fn write_u32(&mut self, at: usize, value: u32) {
        self.write(at, &value.to_le_bytes());
    }
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
                return Ok(Arena { map_base: base, map_len: len, base, len, backing: Backing::HugePages, _file: None });
            }
        }
        let base = mmap_anonymous(len, 0, true)
            .ok_or_else(|| StoreError::Map { bytes: len, source: std::io::Error::last_os_error() })?;
        // SAFETY: `base..base+len` is the mapping just created; madvise only changes paging advice.
        let advised = unsafe { libc::madvise(base.as_ptr().cast(), len, libc::MADV_HUGEPAGE) } == 0;
        let backing = if advised { Backing::TransparentHugePages } else { Backing::SmallPages };
        tracing::info!(bytes = len, backing = backing.name(), "item memory mapped");
        Ok(Arena { map_base: base, map_len: len, base, len, backing, _file: None })
    }

    /// Maps `path` shared, sized to `header + table` bytes of metadata (rounded up to a huge page, so the
    /// items start huge-page aligned) then `len` bytes of items. A file of another size is emptied and
    /// resized first.
    pub fn map_file(path: &Path, header: usize, table: usize, len: usize) -> Result<FileArena, StoreError> {
        let offset = (header + table).next_multiple_of(HUGE_PAGE_SIZE);
        let total = (offset + len).next_multiple_of(HUGE_PAGE_SIZE);
        let fail = |source: std::io::Error| StoreError::File { path: path.to_path_buf(), source };
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(fail)?;
        let fd = file.as_raw_fd();
        // SAFETY: a plain system call on an open descriptor.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(fail(std::io::Error::new(error.kind(), format!("locked by another process? {error}"))));
        }
        // SAFETY: statfs fills the zeroed struct it is given for an open descriptor.
        let hugetlbfs = unsafe {
            let mut fs: libc::statfs = std::mem::zeroed();
            libc::fstatfs(fd, &mut fs) == 0 && fs.f_type as i64 == HUGETLBFS_MAGIC
        };
        let size = file.metadata().map_err(fail)?.len() as usize;
        let reused = size == total;
        if !reused {
            file.set_len(0).map_err(fail)?;
            file.set_len(total as u64).map_err(fail)?;
        }
        if !hugetlbfs {
            // SAFETY: a plain system call on an open descriptor.
            let err = unsafe { libc::posix_fallocate(fd, 0, total as libc::off_t) };
            if err != 0 {
                return Err(fail(std::io::Error::from_raw_os_error(err)));
            }
        }
        // SAFETY: a new shared mapping of the whole file, at an address of the kernel's choosing; the file
        // is `total` bytes long, so every page of the mapping is backed.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), total, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(fail(std::io::Error::last_os_error()));
        }
        let map_base = NonNull::new(ptr.cast::<u8>()).expect("mmap returns a non-null address");
        let backing = if hugetlbfs { Backing::HugePageFile } else { Backing::MemoryFile };
        tracing::info!(bytes = len, path = %path.display(), backing = backing.name(), reused, "item memory mapped from a file");
        // SAFETY: `offset < total`: the items start inside the mapping; `header` and `header + table` too.
        let (base, table_base) = unsafe { (map_base.as_ptr().add(offset), map_base.as_ptr().add(header)) };
        let arena = Arena { map_base, map_len: total, base: NonNull::new(base).expect("inside a mapping"), len, backing, _file: Some(file) };
        Ok(FileArena {
            arena,
            header: Region { base: map_base, len: header },
            table: Region { base: NonNull::new(table_base).expect("inside a mapping"), len: table },
            reused,
        })
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
        // SAFETY: the mapping is `len` readable bytes (zero-filled by the kernel, or a file's contents),
        // alive as long as `self`; no `&mut` to it exists while `&self` is borrowed.
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
        // SAFETY: `map_base..map_base+map_len` is our mapping and no borrow of it outlives `self` (the
        // store drops its regions with it and never uses them after).
        unsafe {
            libc::munmap(self.map_base.as_ptr().cast(), self.map_len);
        }
    }
}

/// Starts loading the cache line holding `place` into every cache level, without waiting for it: a
/// lookup about to run touches it then without stalling. A hint only; it never faults.
#[inline(always)]
pub fn prefetch<T>(place: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `place` is a live reference, and a prefetch neither reads into the program nor faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((place as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = place;
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
