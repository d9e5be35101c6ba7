//! Failover on a node: the epoch kept on disk, and taking over the service address.
//!
//! - [`EpochFile`]: the highest epoch this node has known, in `<state_dir>/epoch`, written to a temporary
//!   file, fsync'd and renamed into place (and the directory fsync'd) before the node acts on it, so a
//!   crash never leaves a node believing in a lower epoch than it acted in.
//! - [`take_service_address`]: adds the service address to the configured interface (netlink) and
//!   announces it with gratuitous ARPs: a burst at once, then repeats, so that neighbours whose caches
//!   missed the burst still move to this node. [`release_service_address`] removes it.
//! - [`ServiceSlot`]: the same in dataplane mode, where the address lives on the workers' userspace
//!   stacks: claiming it asks every stack to add the address, and the first worker's stack announces it
//!   through its NIC queue.
//! - [`release_after_stop`]: the stop hook's step: a node whose tandemd is not running as the active
//!   holds no service address.
//!
//! The decision to promote is made by the replication core ([`crate::replication`]): a standby that
//! was fully synced and has not heard from its active for `dead_after_ms`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use replica::Epoch;

use crate::config::FailoverSettings;
use crate::net::takeover;

/// Gratuitous ARPs sent at once when the address is taken, and their spacing.
pub const ANNOUNCE_BURST: usize = 3;
pub const ANNOUNCE_SPACING: Duration = Duration::from_millis(5);
/// Later repeats, for neighbours that missed the burst.
pub const ANNOUNCE_REPEATS: [Duration; 2] = [Duration::from_millis(500), Duration::from_secs(2)];

/// Kernel mode: bumped by every claim and every release of the service address by this process. A
/// repeated announcement goes out only while the claim that scheduled it stands: one sent after this
/// node gave the address up would point the clients back at it, away from the node that took over.
static CLAIMS: AtomicU64 = AtomicU64::new(0);

/// The service address in dataplane mode. The replication core claims and releases it; every worker's
/// stack checks the version once per poll step and adds or drops the address on its interface.
///
/// It also carries the standby's question before it promotes (see [`crate::failover_guard`]): does
/// another node answer ARP for the address on the clients' link? There the link belongs to DPDK, so
/// the announcing stack sends the probes ([`ServiceSlot::probes_wanted`]) and every stack reports the
/// ARP replies it receives for the address while a probe is open ([`ServiceSlot::heard`]).
#[derive(Debug)]
pub struct ServiceSlot {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    claimed: AtomicBool,
    version: AtomicU64,
    /// How many probes were asked for; the announcing stack sends one per step it has not sent.
    probes: AtomicU64,
    /// Set while a probe's replies are awaited.
    probing: AtomicBool,
    /// The first other MAC that answered for the address since the probe opened.
    holder: std::sync::Mutex<Option<[u8; 6]>>,
}

impl ServiceSlot {
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> ServiceSlot {
        ServiceSlot {
            address,
            prefix_len,
            claimed: AtomicBool::new(false),
            version: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            holder: std::sync::Mutex::new(None),
        }
    }

    /// Who answers ARP for the address on the stacks' link: `tries` probes sent by the announcing
    /// stack, `wait` apart; the first answering MAC (an answer to an early probe counts until the end),
    /// or None. Blocks about `tries * wait`; called by the replication core, never by a worker.
    pub fn probe(&self, tries: usize, wait: Duration) -> Option<[u8; 6]> {
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.probing.store(true, Ordering::SeqCst);
        let start = std::time::Instant::now();
        let deadline = start + wait * tries as u32;
        let mut sent = 0;
        let found = loop {
            let now = std::time::Instant::now();
            // Probe N is due N waits after the first.
            if sent < tries && now >= start + wait * sent as u32 {
                self.probes.fetch_add(1, Ordering::SeqCst);
                sent += 1;
            }
            if let Some(mac) = *self.holder.lock().unwrap_or_else(|e| e.into_inner()) {
                break Some(mac);
            }
            if now >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        self.probing.store(false, Ordering::SeqCst);
        found
    }

    /// The announcing stack: how many probes have been asked for in all (it sends the ones it has not).
    pub fn probes_wanted(&self) -> u64 {
        self.probes.load(Ordering::SeqCst)
    }

    /// Whether ARP replies for the address are awaited (one relaxed load, per batch of frames).
    #[inline]
    pub fn watching(&self) -> bool {
        self.probing.load(Ordering::Relaxed)
    }

    /// A stack received an ARP reply for the address from `mac` (not its own).
    pub fn heard(&self, mac: [u8; 6]) {
        if self.probing.load(Ordering::SeqCst) {
            self.holder.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(mac);
        }
    }

    /// Asks the stacks to take the address (and the announcing stack to announce it).
    pub fn claim(&self) -> takeover::Claimed {
        let was = self.claimed.swap(true, Ordering::SeqCst);
        self.version.fetch_add(1, Ordering::SeqCst);
        if was { takeover::Claimed::AlreadyHeld } else { takeover::Claimed::Added }
    }

    /// Asks the stacks to drop the address.
    pub fn release(&self) -> takeover::Released {
        let was = self.claimed.swap(false, Ordering::SeqCst);
        self.version.fetch_add(1, Ordering::SeqCst);
        if was { takeover::Released::Removed } else { takeover::Released::WasAbsent }
    }

    /// (version, claimed): a stack acts when the version moved since it last looked.
    pub fn state(&self) -> (u64, bool) {
        let version = self.version.load(Ordering::SeqCst);
        (version, self.claimed.load(Ordering::SeqCst))
    }
}

/// Removes the service address from this node: from its interface, or from its stacks.
pub fn release_service_address(failover: &FailoverSettings) -> Result<takeover::Released, takeover::TakeoverError> {
    match &failover.stack {
        Some(slot) => Ok(slot.release()),
        None => {
            CLAIMS.fetch_add(1, Ordering::SeqCst);
            takeover::release(&failover.interface, failover.service_ip, failover.prefix_len)
        }
    }
}

/// Whether this node holds the service address now.
pub fn holds_service_address(failover: &FailoverSettings) -> bool {
    match &failover.stack {
        Some(slot) => slot.state().1,
        None => address_is_local(failover.service_ip),
    }
}

/// Whether the kernel has `address` on one of this node's interfaces: it lets a socket bind only to
/// an address the node has.
fn address_is_local(address: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((address, 0)).is_ok()
}

/// Attempts a node configured as active makes to find an active peer before it takes the address.
const START_PROBES: usize = 4;

/// The role a node last took, as its state directory remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredRole {
    Active,
    Standby,
}

impl StoredRole {
    fn name(self) -> &'static str {
        match self {
            StoredRole::Active => "active",
            StoredRole::Standby => "standby",
        }
    }
}

/// The node's epoch on disk, with the role it took in it: `N active` or `N standby` in `state_dir/epoch`
/// (a bare `N`, as older versions wrote, says no role).
#[derive(Clone)]
pub struct EpochFile {
    dir: PathBuf,
}

impl EpochFile {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: &Path) -> anyhow::Result<EpochFile> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        Ok(EpochFile { dir: dir.to_path_buf() })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("epoch")
    }

    /// The stored epoch (0 when none was ever stored).
    pub fn load(&self) -> anyhow::Result<Epoch> {
        Ok(self.load_state()?.0)
    }

    /// The stored epoch and role (0 and none when nothing was ever stored).
    pub fn load_state(&self) -> anyhow::Result<(Epoch, Option<StoredRole>)> {
        match std::fs::read_to_string(self.path()) {
            Ok(text) => parse_state(&text).with_context(|| format!("{}: not an epoch and role: {text:?}", self.path().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Epoch(0), None)),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.path().display())),
        }
    }

    /// Stores `epoch` and `role` durably (written aside, fsync'd, renamed over, the directory fsync'd).
    pub fn store(&self, epoch: Epoch, role: StoredRole) -> anyhow::Result<()> {
        let tmp = self.dir.join("epoch.tmp");
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        writeln!(file, "{} {}", epoch.0, role.name())?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.path())?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// Parses the epoch file's text: `N`, `N active` or `N standby`.
fn parse_state(text: &str) -> anyhow::Result<(Epoch, Option<StoredRole>)> {
    let mut words = text.split_whitespace();
    let epoch = words.next().ok_or_else(|| anyhow::anyhow!("empty"))?.parse().context("the epoch")?;
    let role = match words.next() {
        None => None,
        Some("active") => Some(StoredRole::Active),
        Some("standby") => Some(StoredRole::Standby),
        Some(other) => anyhow::bail!("unknown role {other:?}"),
    };
    if words.next().is_some() {
        anyhow::bail!("trailing words");
    }
    Ok((Epoch(epoch), role))
}

/// Adds the service address to its interface and announces it; repeats the announcement later on a
/// thread of its own. Errors say what failed (the node serves on regardless).
pub fn take_service_address(failover: &FailoverSettings) -> Result<(), String> {
    if let Some(slot) = &failover.stack {
        if slot.claim() == takeover::Claimed::AlreadyHeld {
            tracing::info!(address = %slot.address, "the stacks already held the service address");
        }
        return Ok(());
    }
    let (interface, address, prefix) = (failover.interface.clone(), failover.service_ip, failover.prefix_len);
    let claim = CLAIMS.fetch_add(1, Ordering::SeqCst) + 1;
    if takeover::claim(&interface, address, prefix).map_err(|e| e.to_string())? == takeover::Claimed::AlreadyHeld {
        tracing::info!(%interface, %address, "the service address was already on the interface");
    }
    takeover::announce(&interface, address, ANNOUNCE_BURST, ANNOUNCE_SPACING).map_err(|e| e.to_string())?;
    let _ = std::thread::Builder::new().name("tandem-garp".into()).spawn(move || {
        let mut waited = Duration::ZERO;
        for at in ANNOUNCE_REPEATS {
            std::thread::sleep(at - waited);
            waited = at;
            // Released by this node, claimed again (that claim repeats its own), or taken off the
            // interface by hand: announcing an address the node does not answer for misleads clients.
            if CLAIMS.load(Ordering::SeqCst) != claim || !address_is_local(address) {
                tracing::info!(%address, "the service address was released, claimed again or removed: no more announcements of this claim");
                return;
            }
            if let Err(e) = takeover::announce(&interface, address, 1, Duration::ZERO) {
                tracing::warn!(error = %e, "repeating the service address announcement failed");
            }
        }
    });
    Ok(())
}

/// Decides the role this node really starts in. A node configured as active first asks its peers: if
/// one of them is an active this node would follow (it took over while this node was away, so its
/// epoch is at least ours), this node starts as a standby of it instead of taking the service address.
/// A node that starts as a standby removes the service address from its interface if it is there (left
/// by a crash: its kernel would otherwise keep answering ARP for it). Returns what was decided, for the
/// role-change log.
pub fn resolve_start_role(settings: &mut crate::config::Settings) -> Vec<String> {
    use crate::config::Role;
    let mut notes = Vec::new();
    let threads = settings.threads as u16;
    let (Some(failover), Some(replication)) = (settings.failover.as_ref(), settings.replication.as_mut()) else {
        return notes;
    };
    let epochs = EpochFile::new(&failover.state_dir);
    let (epoch, stored_role) = epochs.as_ref().ok().and_then(|f| f.load_state().ok()).unwrap_or((Epoch(0), None));
    if replication.role == Role::Standby && stored_role == Some(StoredRole::Active) && replication.listen.is_some() {
        // It was the active when it stopped (a standby promoted since its configuration was written): it
        // is the active again unless a peer took over meanwhile, which the probe below finds. Coming back
        // as a never-synced standby would leave the service address unserved while the other node is down.
        replication.role = Role::Active;
        notes.push(format!("starting as active, not standby: this node was the active at {epoch} when it stopped"));
    }
    if replication.role == Role::Active && !replication.peers.is_empty() {
        // Taking the address while another node holds it is worse than starting a little later: a node
        // whose link just came back may need a few attempts to reach its peers.
        let patience = replication.dead_after.unwrap_or(Duration::from_millis(500)).max(Duration::from_millis(300));
        let found = (0..START_PROBES).find_map(|attempt| {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            replica::receiver::probe_for_active(&replication.peers, &replication.secret, threads, epoch, patience)
        });
        if let Some(found) = found {
            replication.role = Role::Standby;
            // Remembered, so that a restart before this node ever syncs does not claim the role again.
            if let Ok(epochs) = &epochs {
                if let Err(e) = epochs.store(Epoch(found.epoch.0.max(epoch.0)), StoredRole::Standby) {
                    tracing::error!(error = %e, "cannot persist the standby role");
                }
            }
            notes.push(format!(
                "started as standby, not active: {} is the active at {} (ours: {epoch})",
                found.addr, found.epoch
            ));
        }
    }
    if replication.role == Role::Standby {
        match release_service_address(failover) {
            Ok(takeover::Released::Removed) => notes.push(format!(
                "removed the service address {}/{} left on {} (this node is a standby)",
                failover.service_ip, failover.prefix_len, failover.interface
            )),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check the service address on a standby"),
        }
    }
    notes
}

/// What systemd's stop hook (ExecStopPost) runs, through `tandemd --release-service-address`: removes
/// the service address from its interface unless a tandemd on this node is serving as the active (its
/// admin endpoint answers and says so). A tandemd killed by a crash or a signal leaves the address on
/// the interface, and the kernel keeps answering ARP and resetting connections for it (FIELD-NOTES.md);
/// after this, only the node whose tandemd is the active holds it. Returns what was done, for the log.
pub fn release_after_stop(settings: &crate::config::Settings) -> anyhow::Result<String> {
    let Some(failover) = settings.failover.as_ref() else {
        return Ok("no [failover] table: no service address to release".into());
    };
    let address = format!("{}/{} on {}", failover.service_ip, failover.prefix_len, failover.interface);
    if let Some(socket) = &settings.admin_socket {
        match serving_role(socket) {
            Serving::Nobody => {}
            Serving::Role(role) if role == "standby" => {}
            Serving::Role(role) => return Ok(format!("kept {address}: the tandemd at {} serves as the {role}", socket.display())),
            // Something answers there: removing the address under a live active would be worse than
            // leaving a crashed one's (the restarted tandemd or the new active's step-down removes it).
            Serving::Unknown(why) => return Ok(format!("kept {address}: a process answers at {} but its role is unknown ({why})", socket.display())),
        }
    }
    match takeover::release(&failover.interface, failover.service_ip, failover.prefix_len)? {
        takeover::Released::Removed => Ok(format!("removed the service address {address}: no tandemd here serves as the active")),
        takeover::Released::WasAbsent => Ok(format!("the service address {address} was not on this node")),
    }
}

/// Who answers on a node's admin socket.
enum Serving {
    /// Nobody: no socket file, or nothing accepts on it (a dead tandemd's file).
    Nobody,
    /// A tandemd in this role.
    Role(String),
    /// Something accepted but did not say its role.
    Unknown(String),
}

fn serving_role(socket: &Path) -> Serving {
    use std::io::{BufRead, BufReader, ErrorKind};
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => return Serving::Nobody,
        Err(e) => return Serving::Unknown(e.to_string()),
    };
    let asked = stream.set_read_timeout(Some(Duration::from_secs(2))).and_then(|()| stream.write_all(b"status\n"));
    if let Err(e) = asked {
        return Serving::Unknown(e.to_string());
    }
    let role = BufReader::new(stream).lines().map_while(Result::ok).find_map(|line| line.strip_prefix("role ").map(str::to_string));
    role.map_or_else(|| Serving::Unknown("no role in its status".into()), Serving::Role)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_survives_on_disk_and_starts_at_zero() {
        let dir = std::env::temp_dir().join(format!("tandem-epoch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = EpochFile::new(&dir).unwrap();
        assert_eq!(file.load_state().unwrap(), (Epoch(0), None));
        file.store(Epoch(7), StoredRole::Active).unwrap();
        assert_eq!(EpochFile::new(&dir).unwrap().load_state().unwrap(), (Epoch(7), Some(StoredRole::Active)));
        file.store(Epoch(8), StoredRole::Standby).unwrap();
        assert_eq!(file.load_state().unwrap(), (Epoch(8), Some(StoredRole::Standby)));
        assert_eq!(file.load().unwrap(), Epoch(8));
        // What older versions wrote: an epoch alone, no role.
        std::fs::write(dir.join("epoch"), "5\n").unwrap();
        assert_eq!(file.load_state().unwrap(), (Epoch(5), None));
        for damaged in ["garbage", "", "5 leader", "5 active extra"] {
            std::fs::write(dir.join("epoch"), damaged).unwrap();
            assert!(file.load().is_err(), "a damaged epoch file ({damaged:?}) is an error, not epoch 0");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
