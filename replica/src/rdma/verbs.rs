//! A narrow safe layer over libibverbs (through `verbs-sys`): exactly what the RDMA transport needs to
//! write slots into a peer's registered memory over a reliable-connected queue pair.
//!
//! - [`devices`], [`Context::open`]: the device list and an open device; [`Context::query_port`],
//!   [`Context::first_active_port`].
//! - [`Context::gid`], [`Context::roce_v2_ipv4_gid`]: the GID table, and the entry RoCE v2 over IPv4
//!   addresses with (the type from `ibv_query_gid_ex`, or from sysfs when the provider does not say).
//! - [`ProtectionDomain`], [`CompletionQueue`], [`MemoryRegion`] (our own buffers, lkey and rkey
//!   exposed, readable as a [`RingMemory`]), [`QueuePair`] (RC, INIT -> RTR -> RTS with GID addressing).
//! - [`QueuePair::post_write`]: RDMA WRITE and WRITE_WITH_IMM, unsignaled except every
//!   `signal_every`-th (and whenever the caller asks), with the send queue's room accounted from the
//!   signaled completions; [`QueuePair::post_recv`] for the receive a WRITE_WITH_IMM consumes.
//! - [`CompletionQueue::poll`]: completions with every status kept; [`Completion::check`] turns a failed
//!   one into [`VerbsError::Completion`], named as libibverbs names it ("remote access error" ...).
//!
//! Ownership follows the verbs' own rules: a protection domain keeps its device open, a region and a
//! queue pair keep their protection domain, a queue pair keeps its completion queues (each holds an
//! `Arc` of what it was made from), so drop order can never free a parent first.
//!
//! Nothing here allocates per work request; posting builds the work request on the stack.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::raw::c_int;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use verbs_sys as sys;

use crate::ring::RingMemory;

/// What went wrong in a verb.
#[derive(Debug, Error)]
pub enum VerbsError {
    #[error("no RDMA device{0}")]
    NoDevice(String),
    #[error("{call}: {source}")]
    Call { call: &'static str, source: io::Error },
    #[error("{device} port {port} has no RoCE v2 GID with an IPv4 address (is the rxe link up and addressed?)")]
    NoRoceV2Gid { device: String, port: u8 },
    #[error("{device} has no active port")]
    NoActivePort { device: String },
    #[error("work request {wr_id}: {name} (completion status {status}, vendor error {vendor_err:#x})")]
    Completion { wr_id: u64, status: u32, name: &'static str, vendor_err: u32 },
    #[error("{0}")]
    Invalid(&'static str),
}

/// The error of a verb that returns -1 and sets errno (or returns the errno itself, as posts do).
fn call_error(call: &'static str, returned: c_int) -> VerbsError {
    let source = if returned > 0 { io::Error::from_raw_os_error(returned) } else { io::Error::last_os_error() };
    VerbsError::Call { call, source }
}

/// The names libibverbs gives completion statuses ("success", "remote access error" ...).
pub fn status_name(status: u32) -> &'static str {
    // SAFETY: ibv_wc_status_str returns a pointer to a static string for every value (an "unknown"
    // string for values it does not know).
    let name = unsafe { CStr::from_ptr(sys::ibv_wc_status_str(status)) };
    name.to_str().unwrap_or("unnamed status")
}

/// One RDMA device as the device list names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// The node GUID, in the byte order the device reports (network order).
    pub guid: u64,
}

/// The RDMA devices libibverbs finds (an empty list where there are none, as on a host without rxe).
pub fn devices() -> Result<Vec<DeviceInfo>, VerbsError> {
    let list = DeviceList::get()?;
    Ok(list.iter().map(|device| device.info()).collect())
}

/// The device list, freed on drop (`None`: the kernel has no RDMA support at all).
struct DeviceList {
    list: Option<NonNull<*mut sys::ibv_device>>,
    count: usize,
}

/// One entry of a live [`DeviceList`].
struct DeviceRef(*mut sys::ibv_device);

impl DeviceRef {
    fn info(&self) -> DeviceInfo {
        // SAFETY: the device is an entry of a live list; the name is a NUL-terminated string inside it.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(self.0)) }.to_string_lossy().into_owned();
        // SAFETY: as above.
        let guid = unsafe { sys::ibv_get_device_guid(self.0) };
        DeviceInfo { name, guid }
    }
}

impl DeviceList {
    fn get() -> Result<DeviceList, VerbsError> {
        let mut count: c_int = 0;
        // SAFETY: count is a live int; the list is freed in Drop.
        let list = unsafe { sys::ibv_get_device_list(&mut count) };
        match NonNull::new(list) {
            Some(list) => Ok(DeviceList { list: Some(list), count: count.max(0) as usize }),
            // ENOSYS: the kernel has no RDMA subsystem (no /sys/class/infiniband_verbs): no devices.
            None if io::Error::last_os_error().kind() == io::ErrorKind::Unsupported => Ok(DeviceList { list: None, count: 0 }),
            None => Err(call_error("ibv_get_device_list", -1)),
        }
    }

    fn iter(&self) -> impl Iterator<Item = DeviceRef> + '_ {
        // SAFETY: a list holds `count` device pointers (then a NULL); without a list count is 0.
        self.list.into_iter().flat_map(move |list| (0..self.count).map(move |index| DeviceRef(unsafe { *list.as_ptr().add(index) })))
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if let Some(list) = self.list {
            // SAFETY: the list came from ibv_get_device_list and is freed once; opened contexts stay valid.
            unsafe { sys::ibv_free_device_list(list.as_ptr()) };
        }
    }
}

/// A port's state as the transport needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub active: bool,
    /// `ibv_mtu` (1 = 256 ... 5 = 4096).
    pub active_mtu: u32,
    pub gid_table_len: u32,
    pub lid: u16,
    /// Ethernet (RoCE) rather than InfiniBand: addressing by GID only.
    pub ethernet: bool,
}

/// A GID's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GidType {
    Ib,
    RoceV1,
    RoceV2,
}

impl GidType {
    fn from_verbs(gid_type: u32) -> Option<GidType> {
        match gid_type {
            sys::IBV_GID_TYPE_IB => Some(GidType::Ib),
            sys::IBV_GID_TYPE_ROCE_V1 => Some(GidType::RoceV1),
            sys::IBV_GID_TYPE_ROCE_V2 => Some(GidType::RoceV2),
            _ => None,
        }
    }

    /// The type as sysfs writes it (/sys/class/infiniband/DEV/ports/N/gid_attrs/types/INDEX).
    fn from_sysfs(text: &str) -> Option<GidType> {
        match text.trim() {
            "IB/RoCE v1" => Some(GidType::RoceV1),
            "RoCE v2" => Some(GidType::RoceV2),
            "IB" => Some(GidType::Ib),
            _ => None,
        }
    }
}

/// One GID table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: [u8; 16],
    pub gid_type: GidType,
}

impl GidEntry {
    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        let gid = &self.gid;
        (gid[..10].iter().all(|&byte| byte == 0) && gid[10..12] == [0xff, 0xff])
            .then(|| std::net::Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
    }
}

/// The first RoCE v2 entry with an IPv4 address: the one to address a peer on an IPv4 network by.
fn choose_roce_v2_ipv4(entries: impl IntoIterator<Item = GidEntry>) -> Option<GidEntry> {
    entries.into_iter().find(|entry| entry.gid_type == GidType::RoceV2 && entry.ipv4().is_some())
}

struct ContextInner {
    context: NonNull<sys::ibv_context>,
    name: String,
}

// SAFETY: an ibv_context may be used from any thread (libibverbs serializes what needs it); Tandem uses
// each from one replication thread at a time anyway.
unsafe impl Send for ContextInner {}
// SAFETY: as above.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device; every child holds an Arc of this, so none is alive.
        unsafe { sys::ibv_close_device(self.context.as_ptr()) };
    }
}

/// An open RDMA device.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Context({})", self.inner.name)
    }
}

impl Context {
    /// Opens the device called `name`, or with `None` the first one with an active port.
    pub fn open(name: Option<&str>) -> Result<Context, VerbsError> {
        let list = DeviceList::get()?;
        let mut seen = Vec::new();
        for device in list.iter() {
            let info = device.info();
            if name.is_some_and(|wanted| wanted != info.name) {
                seen.push(info.name);
                continue;
            }
            // SAFETY: the device is an entry of the live list; the context outlives the list.
            let context = unsafe { sys::ibv_open_device(device.0) };
            let context = NonNull::new(context).ok_or_else(|| call_error("ibv_open_device", -1))?;
            let opened = Context { inner: Arc::new(ContextInner { context, name: info.name.clone() }) };
            if name.is_some() || opened.first_active_port().is_ok() {
                return Ok(opened);
            }
            seen.push(info.name);
        }
        let which = match name {
            Some(name) => format!(" called {name} (found: {})", seen.join(", ")),
            None if seen.is_empty() => " (ibv_get_device_list is empty)".to_string(),
            None => format!(" with an active port (found: {})", seen.join(", ")),
        };
        Err(VerbsError::NoDevice(which))
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn raw(&self) -> *mut sys::ibv_context {
        self.inner.context.as_ptr()
    }

    pub fn query_port(&self, port: u8) -> Result<PortInfo, VerbsError> {
        let mut attr = sys::ibv_port_attr::default();
        // SAFETY: the context is open; attr is a live ibv_port_attr of this header's size (the shim
        // passes that size to the extended query).
        let returned = unsafe { sys::tandem_ibv_query_port(self.raw(), port, &mut attr) };
        if returned != 0 {
            return Err(call_error("ibv_query_port", returned));
        }
        Ok(PortInfo {
            active: attr.state == sys::IBV_PORT_ACTIVE,
            active_mtu: attr.active_mtu,
            gid_table_len: attr.gid_tbl_len.max(0) as u32,
            lid: attr.lid,
            ethernet: u32::from(attr.link_layer) == sys::IBV_LINK_LAYER_ETHERNET,
        })
    }

    /// The first port (numbered from 1) that is active.
    pub fn first_active_port(&self) -> Result<u8, VerbsError> {
        for port in 1..=u8::MAX {
            match self.query_port(port) {
                Ok(info) if info.active => return Ok(port),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        Err(VerbsError::NoActivePort { device: self.inner.name.clone() })
    }

    /// GID table entry `index` of `port`, with its type; `None` for an empty or unreadable entry.
    pub fn gid(&self, port: u8, index: u32) -> Option<GidEntry> {
        let mut entry = sys::ibv_gid_entry::default();
        // SAFETY: the context is open; entry is a live ibv_gid_entry (the shim passes its size).
        let returned = unsafe { sys::tandem_ibv_query_gid_ex(self.raw(), u32::from(port), index, &mut entry) };
        if returned == 0 {
            // SAFETY: raw is the union's byte view, valid for any contents.
            let gid = unsafe { entry.gid.raw };
            let gid_type = GidType::from_verbs(entry.gid_type)?;
            return (gid != [0; 16]).then_some(GidEntry { index, gid, gid_type });
        }
        // Providers without the extended query: the plain GID and its type from sysfs.
        let mut gid = sys::ibv_gid::default();
        // SAFETY: the context is open; gid is a live ibv_gid.
        if unsafe { sys::ibv_query_gid(self.raw(), port, index as c_int, &mut gid) } != 0 {
            return None;
        }
        // SAFETY: as above.
        let gid = unsafe { gid.raw };
        let path = format!("/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}", self.inner.name);
        let gid_type = GidType::from_sysfs(&std::fs::read_to_string(path).ok()?)?;
        (gid != [0; 16]).then_some(GidEntry { index, gid, gid_type })
    }

    /// The RoCE v2 entry with an IPv4 address (index 1 under Soft-RoCE on an IPv4-addressed netdev).
    pub fn roce_v2_ipv4_gid(&self, port: u8) -> Result<GidEntry, VerbsError> {
        let table = self.query_port(port)?.gid_table_len;
        choose_roce_v2_ipv4((0..table).filter_map(|index| self.gid(port, index)))
            .ok_or_else(|| VerbsError::NoRoceV2Gid { device: self.inner.name.clone(), port })
    }
}

struct PdInner {
    pd: NonNull<sys::ibv_pd>,
    context: Context,
}

// SAFETY: a protection domain is a handle usable from any thread.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; regions and queue pairs hold an Arc of this, so none is left.
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A protection domain: regions and queue pairs in it may work together.
#[derive(Clone)]
pub struct ProtectionDomain {
    inner: Arc<PdInner>,
}

impl ProtectionDomain {
    pub fn new(context: &Context) -> Result<ProtectionDomain, VerbsError> {
        // SAFETY: the context is open.
        let pd = unsafe { sys::ibv_alloc_pd(context.raw()) };
        let pd = NonNull::new(pd).ok_or_else(|| call_error("ibv_alloc_pd", -1))?;
        Ok(ProtectionDomain { inner: Arc::new(PdInner { pd, context: context.clone() }) })
    }

    pub fn context(&self) -> &Context {
        &self.inner.context
    }
}

/// Who may touch a registered region besides its owner's CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Sent from only (the active's slot mirror).
    LocalOnly,
    /// Written by the peer with RDMA WRITE (the standby's rings, the active's credit region).
    RemoteWrite,
}

impl Access {
    fn flags(self) -> u32 {
        match self {
            Access::LocalOnly => sys::IBV_ACCESS_LOCAL_WRITE,
            Access::RemoteWrite => sys::IBV_ACCESS_LOCAL_WRITE | sys::IBV_ACCESS_REMOTE_WRITE,
        }
    }
}

/// What a peer needs to write into a region: travels over the control channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

impl RemoteRegion {
    /// Bytes of [`RemoteRegion::encode`].
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; RemoteRegion::LEN] {
        let mut out = [0u8; RemoteRegion::LEN];
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; RemoteRegion::LEN]) -> RemoteRegion {
        RemoteRegion {
            addr: u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            rkey: u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")),
        }
    }
}

/// Page-aligned zeroed memory of our own, registered with the device.
///
/// The NIC may write it at any time (a peer's RDMA WRITE), so Rust never holds a reference into it: it is
/// read and written only through raw-pointer copies ([`MemoryRegion::write_at`], [`RingMemory`]), and
/// the 8-byte words the ring polls are read as atomics.
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    buf: NonNull<u8>,
    len: usize,
    _pd: ProtectionDomain,
}

// SAFETY: the region's memory is owned by it and only touched through its methods; the ibv_mr is a
// handle usable from any thread.
unsafe impl Send for MemoryRegion {}

const PAGE: usize = 4096;

impl MemoryRegion {
    /// Allocates `len` zeroed bytes (page-aligned) and registers them in `pd` with `access`.
    pub fn new(pd: &ProtectionDomain, len: usize, access: Access) -> Result<MemoryRegion, VerbsError> {
        if len == 0 {
            return Err(VerbsError::Invalid("an empty memory region"));
        }
        let layout = std::alloc::Layout::from_size_align(len, PAGE).map_err(|_| VerbsError::Invalid("region too large"))?;
        // SAFETY: the layout has a non-zero size.
        let buf = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(VerbsError::Invalid("out of memory"))?;
        // SAFETY: the protection domain is live; buf is len bytes we own until Drop, which deregisters
        // before freeing them.
        let mr = unsafe { sys::ibv_reg_mr(pd.inner.pd.as_ptr(), buf.as_ptr().cast(), len, access.flags() as c_int) };
        let Some(mr) = NonNull::new(mr) else {
            let error = call_error("ibv_reg_mr", -1);
            // SAFETY: allocated above with this layout, never registered.
            unsafe { std::alloc::dealloc(buf.as_ptr(), layout) };
            return Err(error);
        };
        Ok(MemoryRegion { mr, buf, len, _pd: pd.clone() })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key local work requests name this region by.
    pub fn lkey(&self) -> u32 {
        // SAFETY: the ibv_mr is live while self is; lkey is a plain field.
        unsafe { self.mr.as_ref().lkey }
    }

    /// The key a peer names this region by in its RDMA WRITEs.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.mr.as_ref().rkey }
    }

    /// The region's address as the device sees it (its virtual address).
    pub fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    /// What a peer needs to write into this region.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion { addr: self.addr(), len: self.len as u64, rkey: self.rkey() }
    }

    /// Copies `bytes` into the region at `offset` (e.g. slots into the active's mirror before a WRITE).
    pub fn write_at(&self, offset: usize, bytes: &[u8]) {
        assert!(offset.checked_add(bytes.len()).is_some_and(|end| end <= self.len), "write inside the region");
        // SAFETY: in bounds (checked); the region is ours and never referenced, only copied to and from.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.buf.as_ptr().add(offset), bytes.len()) };
    }

    /// Zeroes the whole region (a ring before it is offered to a new connection).
    pub fn zero(&self) {
        // SAFETY: the whole region is ours; see write_at.
        unsafe { ptr::write_bytes(self.buf.as_ptr(), 0, self.len) };
    }
}

impl RingMemory for MemoryRegion {
    fn region_len(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset.checked_add(out.len()).is_some_and(|end| end <= self.len), "read inside the region");
        // SAFETY: in bounds (checked); a copy out of memory the NIC may be writing: the ring checks
        // what it copied, never the memory itself.
        unsafe { ptr::copy_nonoverlapping(self.buf.as_ptr().add(offset), out.as_mut_ptr(), out.len()) };
    }

    fn read_u64(&self, offset: usize) -> u64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len, "an aligned word inside the region");
        // SAFETY: in bounds and 8-aligned (the buffer is page-aligned); nothing else in Rust touches it
        // non-atomically. Acquire: bytes read after the word are not older than it.
        let word = unsafe { AtomicU64::from_ptr(self.buf.as_ptr().add(offset).cast()) };
        u64::from_le(word.load(Ordering::Acquire))
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered in new and deregistered once, before the memory goes.
        unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        let layout = std::alloc::Layout::from_size_align(self.len, PAGE).expect("valid in new");
        // SAFETY: allocated in new with this layout; the device no longer maps it.
        unsafe { std::alloc::dealloc(self.buf.as_ptr(), layout) };
    }
}

/// A finished work request as the completion queue reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    /// `ibv_wc_status`: 0 is success.
    pub status: u32,
    /// `ibv_wc_opcode`.
    pub opcode: u32,
    pub byte_len: u32,
    /// The immediate data of a received WRITE_WITH_IMM (host order).
    pub imm: Option<u32>,
    pub vendor_err: u32,
    pub qp_num: u32,
}

impl Completion {
    fn from_wc(wc: &sys::ibv_wc) -> Completion {
        let with_imm = wc.wc_flags & sys::IBV_WC_WITH_IMM != 0;
        // SAFETY: imm_data is the union's member for a completion flagged WITH_IMM; a u32 either way.
        let imm = with_imm.then(|| u32::from_be(unsafe { wc.__bindgen_anon_1.imm_data }));
        Completion {
            wr_id: wc.wr_id,
            status: wc.status,
            opcode: wc.opcode,
            byte_len: wc.byte_len,
            imm,
            vendor_err: wc.vendor_err,
            qp_num: wc.qp_num,
        }
    }

    pub fn is_success(&self) -> bool {
        self.status == sys::IBV_WC_SUCCESS
    }

    /// A received WRITE_WITH_IMM (as opposed to the completion of our own send).
    pub fn is_write_with_imm_received(&self) -> bool {
        self.opcode == sys::IBV_WC_RECV_RDMA_WITH_IMM
    }

    /// `Ok` for a successful completion, else the status by name.
    pub fn check(&self) -> Result<(), VerbsError> {
        if self.is_success() {
            return Ok(());
        }
        Err(VerbsError::Completion {
            wr_id: self.wr_id,
            status: self.status,
            name: status_name(self.status),
            vendor_err: self.vendor_err,
        })
    }
}

struct CqInner {
    cq: NonNull<sys::ibv_cq>,
    _context: Context,
}

// SAFETY: a CQ handle is usable from any thread; polling it is done by one thread at a time (&mut).
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; queue pairs using it hold an Arc of this, so none is left.
        unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// A completion queue, polled (no completion channel: the replication core runs a poll loop).
pub struct CompletionQueue {
    inner: Arc<CqInner>,
    /// Work completions as the provider writes them, reused by every poll.
    wcs: Vec<sys::ibv_wc>,
}

impl CompletionQueue {
    /// A queue with room for at least `entries` completions.
    pub fn new(context: &Context, entries: u32) -> Result<CompletionQueue, VerbsError> {
        let entries = c_int::try_from(entries).map_err(|_| VerbsError::Invalid("too many CQ entries"))?;
        // SAFETY: the context is open; no completion channel, no context pointer.
        let cq = unsafe { sys::ibv_create_cq(context.raw(), entries, ptr::null_mut(), ptr::null_mut(), 0) };
        let cq = NonNull::new(cq).ok_or_else(|| call_error("ibv_create_cq", -1))?;
        let wcs = vec![sys::ibv_wc::default(); 32];
        Ok(CompletionQueue { inner: Arc::new(CqInner { cq, _context: context.clone() }), wcs })
    }

    /// Appends the completions waiting (at most 32 per call) to `out`; returns how many. Failed
    /// completions are returned like the others: see [`Completion::check`].
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, VerbsError> {
        // SAFETY: the CQ is live; wcs has room for its length in entries.
        let found = unsafe { sys::tandem_ibv_poll_cq(self.inner.cq.as_ptr(), self.wcs.len() as c_int, self.wcs.as_mut_ptr()) };
        if found < 0 {
            return Err(call_error("ibv_poll_cq", found));
        }
        out.extend(self.wcs[..found as usize].iter().map(Completion::from_wc));
        Ok(found as usize)
    }
}

/// What a peer needs to connect its queue pair to ours: travels over the control channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub qp_num: u32,
    /// The first packet sequence number our side sends with.
    pub psn: u32,
    pub gid: [u8; 16],
    pub lid: u16,
}

impl Endpoint {
    /// Bytes of [`Endpoint::encode`].
    pub const LEN: usize = 26;

    pub fn encode(&self) -> [u8; Endpoint::LEN] {
        let mut out = [0u8; Endpoint::LEN];
        out[0..4].copy_from_slice(&self.qp_num.to_le_bytes());
        out[4..8].copy_from_slice(&self.psn.to_le_bytes());
        out[8..24].copy_from_slice(&self.gid);
        out[24..26].copy_from_slice(&self.lid.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; Endpoint::LEN]) -> Endpoint {
        Endpoint {
            qp_num: u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")),
            psn: u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) & 0xff_ffff,
            gid: bytes[8..24].try_into().expect("16 bytes"),
            lid: u16::from_le_bytes(bytes[24..26].try_into().expect("2 bytes")),
        }
    }
}

/// Sizes of a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpConfig {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    /// Every this many writes one is signaled (the rest complete silently).
    pub signal_every: u32,
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig { max_send_wr: 256, max_recv_wr: 256, signal_every: 32 }
    }
}

/// Where a queue pair is addressed from: port and local GID index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAddress {
    pub port: u8,
    pub gid_index: u8,
    pub mtu: u32,
}

/// One RDMA WRITE: `len` bytes at `local_offset` of `local` to `remote_addr` (an address inside a region
/// the peer registered, named by `rkey`), with immediate data if `imm` is set (WRITE_WITH_IMM).
#[derive(Clone, Copy, Debug)]
pub struct Write<'a> {
    pub wr_id: u64,
    pub local: &'a MemoryRegion,
    pub local_offset: usize,
    pub len: usize,
    pub remote_addr: u64,
    pub rkey: u32,
    pub imm: Option<u32>,
    /// Ask for a completion even if it is not this write's turn.
    pub signal: bool,
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemoryRegion({:#x}, {} bytes, lkey {:#x}, rkey {:#x})", self.addr(), self.len, self.lkey(), self.rkey())
    }
}

/// A reliable-connected queue pair.
pub struct QueuePair {
    qp: NonNull<sys::ibv_qp>,
    config: QpConfig,
    /// Work requests posted and not yet known complete (a signaled completion retires it and every
    /// unsignaled one before it).
    outstanding: u32,
    /// Writes since the last signaled one.
    since_signal: u32,
    /// (wr_id, work requests outstanding through it) of each signaled request in flight.
    signaled: VecDeque<(u64, u32)>,
    _pd: ProtectionDomain,
    _send_cq: Arc<CqInner>,
    _recv_cq: Arc<CqInner>,
}

// SAFETY: a QP handle is usable from any thread; posting takes &mut self.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// An RC queue pair in the RESET state; [`QueuePair::connect`] brings it to RTS.
    pub fn new_rc(pd: &ProtectionDomain, send_cq: &CompletionQueue, recv_cq: &CompletionQueue, config: QpConfig) -> Result<QueuePair, VerbsError> {
        if config.signal_every == 0 || config.signal_every > config.max_send_wr {
            return Err(VerbsError::Invalid("signal_every must be 1 ..= max_send_wr"));
        }
        let mut init = sys::ibv_qp_init_attr {
            send_cq: send_cq.inner.cq.as_ptr(),
            recv_cq: recv_cq.inner.cq.as_ptr(),
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        init.cap.max_send_wr = config.max_send_wr;
        init.cap.max_recv_wr = config.max_recv_wr;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd and both CQs are live (and kept alive by the QP); init is a live attribute struct.
        let qp = unsafe { sys::ibv_create_qp(pd.inner.pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| call_error("ibv_create_qp", -1))?;
        Ok(QueuePair {
            qp,
            config,
            outstanding: 0,
            since_signal: 0,
            signaled: VecDeque::with_capacity((config.max_send_wr / config.signal_every + 2) as usize),
            _pd: pd.clone(),
            _send_cq: send_cq.inner.clone(),
            _recv_cq: recv_cq.inner.clone(),
        })
    }

    pub fn qp_num(&self) -> u32 {
        // SAFETY: the QP is live.
        unsafe { sys::tandem_ibv_qp_num(self.qp.as_ptr()) }
    }

    fn modify(&mut self, call: &'static str, attr: &mut sys::ibv_qp_attr, mask: u32) -> Result<(), VerbsError> {
        // SAFETY: the QP is live; attr is a live attribute struct whose masked fields are set.
        let returned = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask as c_int) };
        if returned != 0 {
            return Err(call_error(call, returned));
        }
        Ok(())
    }

    /// RESET -> INIT -> RTR -> RTS towards `remote`, addressed by GID (RoCE needs it; IB accepts it).
    /// `local_psn` is the first packet sequence number we send with (the one our [`Endpoint`] told).
    pub fn connect(&mut self, local: PortAddress, local_psn: u32, remote: &Endpoint) -> Result<(), VerbsError> {
        let mut attr = sys::ibv_qp_attr {
            qp_state: sys::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: local.port,
            qp_access_flags: sys::IBV_ACCESS_LOCAL_WRITE | sys::IBV_ACCESS_REMOTE_WRITE,
            ..Default::default()
        };
        self.modify(
            "ibv_modify_qp(INIT)",
            &mut attr,
            sys::IBV_QP_STATE | sys::IBV_QP_PKEY_INDEX | sys::IBV_QP_PORT | sys::IBV_QP_ACCESS_FLAGS,
        )?;

        let mut attr = sys::ibv_qp_attr {
            qp_state: sys::IBV_QPS_RTR,
            path_mtu: local.mtu,
            dest_qp_num: remote.qp_num,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ..Default::default()
        };
        attr.ah_attr.is_global = 1;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.port_num = local.port;
        attr.ah_attr.grh.dgid.raw = remote.gid;
        attr.ah_attr.grh.sgid_index = local.gid_index;
        attr.ah_attr.grh.hop_limit = 64;
        self.modify(
            "ibv_modify_qp(RTR)",
            &mut attr,
            sys::IBV_QP_STATE
                | sys::IBV_QP_AV
                | sys::IBV_QP_PATH_MTU
                | sys::IBV_QP_DEST_QPN
                | sys::IBV_QP_RQ_PSN
                | sys::IBV_QP_MAX_DEST_RD_ATOMIC
                | sys::IBV_QP_MIN_RNR_TIMER,
        )?;

        let mut attr = sys::ibv_qp_attr {
            qp_state: sys::IBV_QPS_RTS,
            sq_psn: local_psn,
            timeout: 14,
            retry_cnt: 7,
            // A WRITE_WITH_IMM needs a posted receive at the peer; wait for one rather than fail.
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        self.modify(
            "ibv_modify_qp(RTS)",
            &mut attr,
            sys::IBV_QP_STATE
                | sys::IBV_QP_SQ_PSN
                | sys::IBV_QP_TIMEOUT
                | sys::IBV_QP_RETRY_CNT
                | sys::IBV_QP_RNR_RETRY
                | sys::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Moves the queue pair to the error state: posted work completes with "Work Request Flushed Error"
    /// (how a transport tears a link down, and how the tests force the error path).
    pub fn set_error(&mut self) -> Result<(), VerbsError> {
        let mut attr = sys::ibv_qp_attr { qp_state: sys::IBV_QPS_ERR, ..Default::default() };
        self.modify("ibv_modify_qp(ERR)", &mut attr, sys::IBV_QP_STATE)
    }

    /// Work requests the send queue can take now.
    pub fn send_room(&self) -> u32 {
        self.config.max_send_wr - self.outstanding
    }

    /// Posts one RDMA WRITE (or WRITE_WITH_IMM). Unsignaled unless it is the `signal_every`-th, the
    /// caller asks, or the send queue would otherwise fill up with nothing left to report its progress.
    /// Returns whether it was signaled.
    pub fn post_write(&mut self, write: &Write<'_>) -> Result<bool, VerbsError> {
        if self.send_room() == 0 {
            return Err(VerbsError::Invalid("send queue full: poll completions first"));
        }
        assert!(
            write.local_offset.checked_add(write.len).is_some_and(|end| end <= write.local.len()),
            "a write from inside the local region"
        );
        let length = u32::try_from(write.len).map_err(|_| VerbsError::Invalid("a write above 4 GiB"))?;
        let signal = write.signal
            || self.since_signal + 1 >= self.config.signal_every
            || self.outstanding + 1 >= self.config.max_send_wr;
        let mut sge = sys::ibv_sge { addr: write.local.addr() + write.local_offset as u64, length, lkey: write.local.lkey() };
        let mut wr = sys::ibv_send_wr {
            wr_id: write.wr_id,
            sg_list: &mut sge,
            num_sge: 1,
            opcode: if write.imm.is_some() { sys::IBV_WR_RDMA_WRITE_WITH_IMM } else { sys::IBV_WR_RDMA_WRITE },
            send_flags: if signal { sys::IBV_SEND_SIGNALED } else { 0 },
            ..Default::default()
        };
        wr.__bindgen_anon_1.imm_data = write.imm.unwrap_or(0).to_be();
        wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr: write.remote_addr, rkey: write.rkey };
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live; wr and sge are live for the call (the provider copies them into its
        // queue); the local bytes stay registered while the region lives, which the caller keeps until
        // the write completes (signaled, or retired by a later signaled one).
        let returned = unsafe { sys::tandem_ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad) };
        if returned != 0 {
            return Err(call_error("ibv_post_send", returned));
        }
        self.outstanding += 1;
        if signal {
            self.since_signal = 0;
            self.signaled.push_back((write.wr_id, self.outstanding));
        } else {
            self.since_signal += 1;
        }
        Ok(signal)
    }

    /// Takes note of a send completion of this queue pair: a signaled one retires itself and every
    /// unsignaled request before it. A failed one (flushed, in the error state) retires everything.
    pub fn retire(&mut self, completion: &Completion) {
        if !completion.is_success() {
            self.outstanding = 0;
            self.signaled.clear();
            return;
        }
        while let Some((wr_id, through)) = self.signaled.pop_front() {
            let retired = through.min(self.outstanding);
            self.outstanding -= retired;
            for entry in self.signaled.iter_mut() {
                entry.1 -= retired;
            }
            if wr_id == completion.wr_id {
                break;
            }
        }
    }

    /// Posts a receive with no buffer: a WRITE_WITH_IMM from the peer consumes one to deliver its
    /// immediate data (the data itself lands in the region the WRITE names). Only from INIT on: in
    /// RESET, rxe refuses it with EINVAL (seen in the guests).
    pub fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError> {
        let mut wr = sys::ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: ptr::null_mut(), num_sge: 0 };
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP is live; wr is live for the call and names no buffer.
        let returned = unsafe { sys::tandem_ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad) };
        if returned != 0 {
            return Err(call_error("ibv_post_recv", returned));
        }
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp and destroyed once; its CQs and PD are still alive (held).
        unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_completion_status_has_a_name() {
        let names: Vec<&str> = (sys::IBV_WC_SUCCESS..=sys::IBV_WC_TM_RNDV_INCOMPLETE).map(status_name).collect();
        assert_eq!(names[0], "success");
        assert_eq!(names[sys::IBV_WC_WR_FLUSH_ERR as usize], "Work Request Flushed Error");
        assert_eq!(names[sys::IBV_WC_REM_ACCESS_ERR as usize], "remote access error");
        assert!(names.iter().all(|name| !name.is_empty() && !name.contains("unknown")), "{names:?}");
        let failed = Completion { wr_id: 7, status: sys::IBV_WC_REM_ACCESS_ERR, opcode: 0, byte_len: 0, imm: None, vendor_err: 0x81, qp_num: 3 };
        assert_eq!(
            failed.check().unwrap_err().to_string(),
            "work request 7: remote access error (completion status 10, vendor error 0x81)"
        );
    }

    #[test]
    fn the_roce_v2_ipv4_gid_is_chosen() {
        let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56];
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2];
        let table = [
            GidEntry { index: 0, gid: link_local, gid_type: GidType::RoceV1 },
            GidEntry { index: 1, gid: link_local, gid_type: GidType::RoceV2 },
            GidEntry { index: 2, gid: mapped, gid_type: GidType::RoceV1 },
            GidEntry { index: 3, gid: mapped, gid_type: GidType::RoceV2 },
        ];
        let chosen = choose_roce_v2_ipv4(table).unwrap();
        assert_eq!((chosen.index, chosen.ipv4()), (3, Some(std::net::Ipv4Addr::new(10, 0, 0, 2))));
        assert_eq!(choose_roce_v2_ipv4(table[..3].iter().copied()), None);
        assert_eq!(GidType::from_sysfs("RoCE v2\n"), Some(GidType::RoceV2));
        assert_eq!(GidType::from_sysfs("IB/RoCE v1\n"), Some(GidType::RoceV1));
        assert_eq!(GidType::from_sysfs("something else"), None);
    }

    #[test]
    fn endpoints_and_regions_cross_the_control_channel() {
        let endpoint = Endpoint { qp_num: 0x11, psn: 0x12_3456, gid: [7; 16], lid: 0 };
        assert_eq!(Endpoint::decode(&endpoint.encode()), endpoint);
        let region = RemoteRegion { addr: 0x7f00_dead_b000, len: 1 << 20, rkey: 0x1234 };
        assert_eq!(RemoteRegion::decode(&region.encode()), region);
    }

    /// The verbs against a real device: runs where one exists (a guest with Soft-RoCE), says why not
    /// elsewhere. One QP connected to itself (loopback through the device) writes into a region.
    #[test]
    fn a_queue_pair_writes_into_a_region_through_the_device() {
        let devices = devices().expect("the device list");
        if devices.is_empty() {
            eprintln!("skipped: no RDMA device (this kernel has no rdma_rxe); the guests run this test");
            return;
        }
        loopback_write().unwrap();
    }

    fn loopback_write() -> Result<(), VerbsError> {
        let context = Context::open(None)?;
        let port = context.first_active_port()?;
        let info = context.query_port(port)?;
        let gid = context.roce_v2_ipv4_gid(port)?;
        let pd = ProtectionDomain::new(&context)?;
        let mut cq = CompletionQueue::new(&context, 64)?;
        let recv_cq = CompletionQueue::new(&context, 64)?;
        let mut qp = QueuePair::new_rc(&pd, &cq, &recv_cq, QpConfig { max_send_wr: 16, max_recv_wr: 4, signal_every: 4 })?;
        let local = PortAddress { port, gid_index: gid.index as u8, mtu: info.active_mtu };
        let me = Endpoint { qp_num: qp.qp_num(), psn: 1, gid: gid.gid, lid: info.lid };
        qp.connect(local, 1, &me)?;
        let source = MemoryRegion::new(&pd, 4096, Access::LocalOnly)?;
        let target = MemoryRegion::new(&pd, 4096, Access::RemoteWrite)?;
        source.write_at(0, b"written one-sided");
        let remote = target.remote();
        let write = Write { wr_id: 1, local: &source, local_offset: 0, len: 17, remote_addr: remote.addr, rkey: remote.rkey, imm: None, signal: true };
        assert!(qp.post_write(&write)?);
        let mut done = Vec::new();
        while done.is_empty() {
            cq.poll(&mut done)?;
        }
        done[0].check()?;
        let mut copy = [0u8; 17];
        target.read(0, &mut copy);
        assert_eq!(&copy, b"written one-sided");
        // A wrong rkey: the completion names the error.
        let wrong = Write { wr_id: 2, rkey: remote.rkey ^ 0xffff, ..write };
        qp.post_write(&wrong)?;
        done.clear();
        while done.is_empty() {
            cq.poll(&mut done)?;
        }
        assert!(matches!(done[0].check(), Err(VerbsError::Completion { status: sys::IBV_WC_REM_ACCESS_ERR, .. })), "{done:?}");
        Ok(())
    }
}
