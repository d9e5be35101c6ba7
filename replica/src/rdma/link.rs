//! The RDMA transport's ends over verbs: [`ActivePort`] (a [`RingPort`]) and [`StandbyRing`] (a
//! [`RingHome`]), and their setup over the authenticated TCP control connection.
//!
//! After the handshake the standby registers a zeroed receive ring and makes an RC queue pair; it sends
//! an offer ([`StandbyRing::offer`]: its endpoint, the ring's address, length and rkey, the slot size
//! and count, a fresh ring id). The active makes its queue pair, a staging region the ring's size (the
//! bytes its WRITEs are sent from) and a credit region the standby may write; it connects and answers
//! with its endpoint and the credit region ([`ActivePort::accept`]). The standby connects, posts the
//! receives the doorbells consume, and says it is ready; only then does the active write.
//!
//! The active's WRITEs are unsignaled but every [`QpConfig::signal_every`]-th; a push's last WRITE
//! carries the doorbell (WRITE_WITH_IMM). The standby's credit writes go from a small rotating region,
//! also mostly unsignaled. Any failed completion on either end is an error that ends the connection
//! (the standby reconnects and resyncs from what its shards applied).
//!
//! [`take_fault`]: fault injection for the system tests (a wrong rkey, a queue pair forced into the
//! error state), read from a file named by `TANDEM_RDMA_FAULT_FILE`; inert unless that file exists.

use std::sync::Arc;

use crate::rdma::verbs::{
    Access, Completion, CompletionQueue, Context, Endpoint, GidEntry, MemoryRegion, PortAddress, PortInfo,
    ProtectionDomain, QpConfig, QueuePair, RemoteRegion, VerbsError, Write,
};
use crate::ring::{RingLayout, RingMemory, CREDIT_LEN};
use crate::ring_link::{RingHome, RingPort};
use crate::transport::{LinkError, LinkStats};

/// Slot size of the rings the standby offers: a batch of 256 KiB takes 5 slots.
pub const SLOT_SIZE: usize = 64 << 10;
/// Slots per ring (4 MiB of registered memory per standby connection).
pub const SLOT_COUNT: usize = 64;
/// Bytes of an offer: endpoint, ring region, slot size u32, slot count u32, ring id u64.
pub const OFFER_LEN: usize = Endpoint::LEN + RemoteRegion::LEN + 16;
/// Bytes of an accept: endpoint, credit region.
pub const ACCEPT_LEN: usize = Endpoint::LEN + RemoteRegion::LEN;
/// Credit records the standby rotates through (its credit writes' sources).
const CREDIT_SLOTS: usize = 256;

const QP: QpConfig = QpConfig { max_send_wr: 256, max_recv_wr: 256, signal_every: 32 };

impl From<VerbsError> for LinkError {
    fn from(error: VerbsError) -> LinkError {
        LinkError::Rdma(error.to_string())
    }
}

/// An opened device port with its protection domain: shared by every connection of a node.
pub struct Device {
    context: Context,
    pd: ProtectionDomain,
    port: u8,
    info: PortInfo,
    gid: GidEntry,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} port {} GID index {}", self.context.name(), self.port, self.gid.index)
    }
}

impl Device {
    /// Opens `name` (default: the first device with an active port) on its first active port, addressed
    /// by `gid_index` (default: the RoCE v2 entry with an IPv4 address).
    pub fn open(name: Option<&str>, gid_index: Option<u8>) -> Result<Arc<Device>, VerbsError> {
        let context = match name {
            Some(name) => Context::open(Some(name))?,
            None => first_active_device()?,
        };
        let port = context.first_active_port()?;
        let info = context.query_port(port)?;
        let gid = match gid_index {
            Some(index) => context.gid(port, u32::from(index)).ok_or(VerbsError::Invalid("no such GID index on the port"))?,
            None => context.roce_v2_ipv4_gid(port)?,
        };
        let pd = ProtectionDomain::new(&context)?;
        Ok(Arc::new(Device { context, pd, port, info, gid }))
    }

    fn address(&self) -> PortAddress {
        PortAddress { port: self.port, gid_index: self.gid.index as u8, mtu: self.info.active_mtu }
    }

    fn endpoint(&self, qp: &QueuePair, psn: u32) -> Endpoint {
        Endpoint { qp_num: qp.qp_num(), psn, gid: self.gid.gid, lid: self.info.lid }
    }

    fn queue_pair(&self) -> Result<(QueuePair, CompletionQueue), VerbsError> {
        let cq = CompletionQueue::new(&self.context, QP.max_send_wr + QP.max_recv_wr)?;
        let qp = QueuePair::new_rc(&self.pd, &cq, &cq, QP)?;
        Ok((qp, cq))
    }
}

fn first_active_device() -> Result<Context, VerbsError> {
    let devices = crate::rdma::verbs::devices()?;
    let mut last = VerbsError::NoDevice(String::new());
    for device in &devices {
        match Context::open(Some(&device.name)) {
            Ok(context) if context.first_active_port().is_ok() => return Ok(context),
            Ok(context) => last = VerbsError::NoActivePort { device: context.name().to_string() },
            Err(error) => last = error,
        }
    }
    Err(last)
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the system's random source");
    u64::from_le_bytes(bytes)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Takes every completion waiting on `cq`: failed ones are errors (counted), successful sends retire
/// work requests, received doorbells go to `doorbells`.
fn drain(
    cq: &mut CompletionQueue,
    qp: &mut QueuePair,
    scratch: &mut Vec<Completion>,
    stats: &mut LinkStats,
    mut doorbells: Option<&mut Vec<u32>>,
) -> Result<(), LinkError> {
    loop {
        scratch.clear();
        if cq.poll(scratch)? == 0 {
            return Ok(());
        }
        for completion in scratch.iter() {
            stats.completions += 1;
            if let Err(error) = completion.check() {
                stats.errors += 1;
                qp.retire(completion);
                return Err(error.into());
            }
            if completion.is_write_with_imm_received() {
                stats.doorbells += 1;
                if let Some(out) = doorbells.as_deref_mut() {
                    out.push(completion.imm.unwrap_or(0));
                }
                qp.post_recv(completion.wr_id)?;
            } else {
                qp.retire(completion);
            }
        }
    }
}

/// The active's end of one RDMA link.
pub struct ActivePort {
    qp: QueuePair,
    cq: CompletionQueue,
    staging: MemoryRegion,
    credits: MemoryRegion,
    ring: RemoteRegion,
    next_wr: u64,
    stats: LinkStats,
    scratch: Vec<Completion>,
}

impl ActivePort {
    /// Takes a standby's offer: connects a queue pair to it and returns the port, the ring's layout
    /// and id, and the accept to send back.
    pub fn accept(device: &Device, offer: &[u8]) -> Result<(ActivePort, RingLayout, u64, Vec<u8>), LinkError> {
        if offer.len() != OFFER_LEN {
            return Err(LinkError::Rdma(format!("an RDMA offer of {} bytes (expected {OFFER_LEN})", offer.len())));
        }
        let remote = Endpoint::decode(offer[..Endpoint::LEN].try_into().expect("length checked"));
        let ring = RemoteRegion::decode(offer[Endpoint::LEN..Endpoint::LEN + RemoteRegion::LEN].try_into().expect("length checked"));
        let at = Endpoint::LEN + RemoteRegion::LEN;
        let layout = RingLayout::new(u32_at(offer, at) as usize, u32_at(offer, at + 4) as usize)?;
        let ring_id = u64::from_le_bytes(offer[at + 8..at + 16].try_into().expect("8 bytes"));
        if ring.len < layout.region_len() as u64 {
            return Err(LinkError::Rdma("the offered ring region is smaller than its layout".into()));
        }
        let (mut qp, cq) = device.queue_pair()?;
        let staging = MemoryRegion::new(&device.pd, layout.region_len(), Access::LocalOnly)?;
        let credits = MemoryRegion::new(&device.pd, CREDIT_LEN.next_multiple_of(4096), Access::RemoteWrite)?;
        let psn = (random_u64() as u32) & 0xff_ffff;
        let endpoint = device.endpoint(&qp, psn);
        qp.connect(device.address(), psn, &remote)?;
        let mut answer = Vec::with_capacity(ACCEPT_LEN);
        answer.extend_from_slice(&endpoint.encode());
        answer.extend_from_slice(&credits.remote().encode());
        let port = ActivePort { qp, cq, staging, credits, ring, next_wr: 0, stats: LinkStats::default(), scratch: Vec::new() };
        Ok((port, layout, ring_id, answer))
    }

    /// Fault injection: the next writes name a wrong rkey (the standby's device refuses them).
    pub fn corrupt_rkey(&mut self) {
        self.ring.rkey ^= 0x5a5a;
    }

    /// Fault injection: the queue pair goes to the error state (its work completes flushed).
    pub fn force_error(&mut self) -> Result<(), LinkError> {
        Ok(self.qp.set_error()?)
    }
}

impl RingPort for ActivePort {
    fn write(&mut self, offset: usize, bytes: &[u8], doorbell: Option<u32>) -> Result<(), LinkError> {
        self.staging.write_at(offset, bytes);
        let write = Write {
            wr_id: self.next_wr,
            local: &self.staging,
            local_offset: offset,
            len: bytes.len(),
            remote_addr: self.ring.addr + offset as u64,
            rkey: self.ring.rkey,
            imm: doorbell,
            signal: false,
        };
        self.next_wr += 1;
        if let Err(error) = self.qp.post_write(&write) {
            self.stats.errors += 1;
            return Err(error.into());
        }
        self.stats.writes_posted += 1;
        Ok(())
    }

    fn room(&self) -> usize {
        self.qp.send_room() as usize
    }

    fn poll(&mut self) -> Result<(), LinkError> {
        drain(&mut self.cq, &mut self.qp, &mut self.scratch, &mut self.stats, None)
    }

    fn credit(&self) -> [u8; CREDIT_LEN] {
        let mut record = [0u8; CREDIT_LEN];
        self.credits.read(0, &mut record);
        record
    }

    fn stats(&self) -> LinkStats {
        self.stats
    }
}

/// The standby's end of one RDMA link: its registered ring and queue pair.
pub struct StandbyRing {
    qp: QueuePair,
    cq: CompletionQueue,
    ring: MemoryRegion,
    credit_out: MemoryRegion,
    active_credits: Option<RemoteRegion>,
    endpoint: Endpoint,
    address: PortAddress,
    credit_writes: u64,
    stats: LinkStats,
    scratch: Vec<Completion>,
}

impl StandbyRing {
    /// Registers a zeroed ring of `layout` and a queue pair; returns them, the ring id, and the offer
    /// to send to the active.
    pub fn offer(device: &Device, layout: RingLayout) -> Result<(StandbyRing, u64, Vec<u8>), LinkError> {
        let (qp, cq) = device.queue_pair()?;
        let ring = MemoryRegion::new(&device.pd, layout.region_len(), Access::RemoteWrite)?;
        let credit_out = MemoryRegion::new(&device.pd, CREDIT_SLOTS * CREDIT_LEN, Access::LocalOnly)?;
        let psn = (random_u64() as u32) & 0xff_ffff;
        let endpoint = device.endpoint(&qp, psn);
        let ring_id = random_u64();
        let mut offer = Vec::with_capacity(OFFER_LEN);
        offer.extend_from_slice(&endpoint.encode());
        offer.extend_from_slice(&ring.remote().encode());
        offer.extend_from_slice(&(layout.slot_size() as u32).to_le_bytes());
        offer.extend_from_slice(&(layout.slot_count() as u32).to_le_bytes());
        offer.extend_from_slice(&ring_id.to_le_bytes());
        let standby = StandbyRing {
            qp,
            cq,
            ring,
            credit_out,
            active_credits: None,
            endpoint,
            address: device.address(),
            credit_writes: 0,
            stats: LinkStats::default(),
            scratch: Vec::new(),
        };
        Ok((standby, ring_id, offer))
    }

    /// Takes the active's accept: connects the queue pair and posts the doorbells' receives.
    pub fn connect(&mut self, accept: &[u8]) -> Result<(), LinkError> {
        if accept.len() != ACCEPT_LEN {
            return Err(LinkError::Rdma(format!("an RDMA accept of {} bytes (expected {ACCEPT_LEN})", accept.len())));
        }
        let remote = Endpoint::decode(accept[..Endpoint::LEN].try_into().expect("length checked"));
        let credits = RemoteRegion::decode(accept[Endpoint::LEN..].try_into().expect("length checked"));
        if credits.len < CREDIT_LEN as u64 {
            return Err(LinkError::Rdma("the active's credit region is too small".into()));
        }
        self.qp.connect(self.address, self.endpoint.psn, &remote)?;
        // A queue pair takes receives from INIT on (rxe refuses them in RESET).
        for wr_id in 0..u64::from(QP.max_recv_wr) {
            self.qp.post_recv(wr_id)?;
        }
        self.active_credits = Some(credits);
        Ok(())
    }
}

impl RingHome for StandbyRing {
    type Memory = MemoryRegion;

    fn memory(&self) -> &MemoryRegion {
        &self.ring
    }

    fn doorbells(&mut self, out: &mut Vec<u32>) -> Result<(), LinkError> {
        drain(&mut self.cq, &mut self.qp, &mut self.scratch, &mut self.stats, Some(out))
    }

    fn write_credit(&mut self, record: &[u8; CREDIT_LEN]) -> Result<(), LinkError> {
        let Some(credits) = self.active_credits else { return Err(LinkError::Rdma("a credit before the link is connected".into())) };
        while self.qp.send_room() == 0 {
            drain(&mut self.cq, &mut self.qp, &mut self.scratch, &mut self.stats, None)?;
        }
        // A rotating source: an earlier unsignaled credit write may still be reading its own.
        let offset = (self.credit_writes as usize % CREDIT_SLOTS) * CREDIT_LEN;
        self.credit_out.write_at(offset, record);
        let write = Write {
            wr_id: 1 << 63 | self.credit_writes,
            local: &self.credit_out,
            local_offset: offset,
            len: CREDIT_LEN,
            remote_addr: credits.addr,
            rkey: credits.rkey,
            imm: None,
            signal: false,
        };
        self.credit_writes += 1;
        if let Err(error) = self.qp.post_write(&write) {
            self.stats.errors += 1;
            return Err(error.into());
        }
        self.stats.writes_posted += 1;
        Ok(())
    }

    fn stats(&self) -> LinkStats {
        self.stats
    }
}

/// A fault to inject into the live RDMA links (system tests only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The active's next writes name a wrong rkey.
    WrongRkey,
    /// The active's queue pairs go to the error state.
    QpError,
}

/// The fault asked for in the file named by `TANDEM_RDMA_FAULT_FILE` (`wrong_rkey` or `qp_error`),
/// once: the file is removed once read whole. None when the variable is unset or the file absent.
pub fn take_fault() -> Option<Fault> {
    let path = std::env::var_os("TANDEM_RDMA_FAULT_FILE")?;
    take_fault_from(std::path::Path::new(&path))
}

/// Fault names a fault file may hold, each alone (a trailing newline allowed).
const FAULT_NAMES: [&str; 2] = ["wrong_rkey", "qp_error"];

/// [`take_fault`] from `path`. A writer such as `echo wrong_rkey > file` creates (truncates) the file
/// first and writes it after: a read in between sees it empty, or cut short. Such a read (nothing, or a
/// strict prefix of a fault's name with no newline yet) leaves the file for the next look, so the fault
/// is never lost; anything else is consumed: the file is removed, whether it named a fault or not.
/// Writers that want no window at all write another file and rename it into place.
fn take_fault_from(path: &std::path::Path) -> Option<Fault> {
    let text = std::fs::read_to_string(path).ok()?;
    let unfinished = !text.ends_with('\n') && FAULT_NAMES.iter().any(|name| name.starts_with(text.as_str()) && *name != text);
    if unfinished {
        return None;
    }
    let _ = std::fs::remove_file(path);
    match text.trim() {
        "wrong_rkey" => Some(Fault::WrongRkey),
        "qp_error" => Some(Fault::QpError),
        other => {
            tracing::warn!(fault = other, "unknown RDMA fault asked for (wrong_rkey or qp_error)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::{take_fault_from, Fault};

    /// A fresh path in the temporary directory, removed when dropped.
    struct FaultFile(std::path::PathBuf);

    impl FaultFile {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("tandem-rdma-fault-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            Self(path)
        }
    }

    impl Drop for FaultFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_fault_file_created_but_not_yet_written_keeps_its_fault_for_the_next_look() {
        let file = FaultFile::new("created-then-written");
        // `echo wrong_rkey > file`: the shell creates the file empty, then writes.
        let mut writer = std::fs::File::create(&file.0).unwrap();
        assert_eq!(take_fault_from(&file.0), None);
        assert!(file.0.exists(), "an empty fault file was removed: its writer's fault would be lost");
        writer.write_all(b"wrong_r").unwrap();
        assert_eq!(take_fault_from(&file.0), None);
        assert!(file.0.exists(), "a fault file cut short was removed");
        writer.write_all(b"key\n").unwrap();
        drop(writer);
        assert_eq!(take_fault_from(&file.0), Some(Fault::WrongRkey));
        assert!(!file.0.exists(), "a fault is taken once: its file is removed");
        assert_eq!(take_fault_from(&file.0), None);
    }

    #[test]
    fn a_whole_fault_file_is_taken_once_with_or_without_a_newline_and_anything_else_is_dropped() {
        let file = FaultFile::new("whole");
        std::fs::write(&file.0, "qp_error").unwrap();
        assert_eq!(take_fault_from(&file.0), Some(Fault::QpError));
        assert!(!file.0.exists());
        // Renamed into place: never seen partial.
        let staged = FaultFile::new("whole.new");
        std::fs::write(&staged.0, "wrong_rkey\n").unwrap();
        std::fs::rename(&staged.0, &file.0).unwrap();
        assert_eq!(take_fault_from(&file.0), Some(Fault::WrongRkey));
        // Not a fault and not the start of one: reported, removed, not retried forever.
        std::fs::write(&file.0, "wrong_lkey\n").unwrap();
        assert_eq!(take_fault_from(&file.0), None);
        assert!(!file.0.exists(), "an unknown fault's file stays and is warned about at every look");
        std::fs::write(&file.0, "qp").unwrap();
        assert_eq!(take_fault_from(&file.0), None);
        assert!(file.0.exists(), "a prefix of a fault's name with no newline may still be written to");
    }
}
