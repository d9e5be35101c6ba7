//! The replication handshake: both ends prove they hold the shared secret, then the active decides, shard
//! by shard, whether the standby resumes from its backlog or needs a full sync, or refuses it with a
//! typed reason.
//!
//! Pure state machines over [`Message`]s, no I/O: [`StandbyHandshake`] (the side that connects) and
//! [`ActiveHandshake`]. Feed each the peer's messages; each returns a [`Step`]: messages to send and, at
//! the end, an [`Outcome`]. [`Message::encode`] and [`Message::decode`] are the wire form (the transport
//! supplies the length prefix).
//!
//! ```text
//! standby                                   active
//!   Hello{shards, history, epoch, applied per shard, nonce_s} -->
//!                        <-- Hello{shards, history, epoch, newest per shard, nonce_a}
//!   Proof(HMAC(secret, "standby" || transcript)) -->
//!                        (wrong: <-- Refuse{WrongSecret}, and the active proves nothing)
//!                        <-- Proof(HMAC(secret, "active" || transcript))
//!                        <-- Accept{per shard: Resume{after} | FullSync}  or  Refuse{reason}
//! ```
//!
//! The transcript is both Hellos as encoded, so each proof covers both fresh nonces and everything both
//! sides claimed; the role label keeps a proof from being reflected back. The secret never crosses the
//! wire, and an end that fails to prove itself learns nothing about the other's decision.
//!
//! Refusals ([`RefuseReason`]), all logged through `tracing` where they are decided:
//! - another shard count ([`RefuseReason::ShardCount`]), by either end;
//! - a wrong secret ([`RefuseReason::WrongSecret`]), by either end;
//! - a standby whose history (replication id) the active cannot resume: neither the active's current
//!   id nor the previous one it took over from ([`RefuseReason::UnknownHistory`]). A standby with *no*
//!   history is not refused: it gets a full sync. One with history from another pair is refused rather
//!   than wiped, so a mis-pointed standby does not lose its data silently;
//! - an epoch conflict: the standby refuses an active whose epoch is lower than its own
//!   ([`RefuseReason::LowerEpoch`]: that active is stale), and an active refuses a standby whose epoch
//!   is higher ([`RefuseReason::StaleActive`]: it should step down). A standby with a *lower* epoch is
//!   accepted and adopts the active's: that is how an old active rejoins after a failover;
//! - another protocol version, or a message out of turn.

use crate::ids::{Epoch, LogSeq, ReplicationId, ShardId};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use thiserror::Error;

/// The handshake protocol this crate speaks.
pub const HANDSHAKE_VERSION: u8 = 1;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

const TRANSCRIPT_DOMAIN: &[u8] = b"tandem replication handshake v1";

/// A fresh random challenge.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl Nonce {
    /// A nonce from the operating system's random source.
    pub fn random() -> Nonce {
        let mut bytes = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut bytes).expect("the OS random source is available");
        Nonce(bytes)
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({:02x?}..)", &self.0[..4])
    }
}

/// Which end of the link a message comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

/// What each end says about itself first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u8,
    pub role: Role,
    pub shard_count: u16,
    /// The history this end's data belongs to; `None` for a standby with nothing usable.
    pub history: Option<ReplicationId>,
    pub epoch: Epoch,
    /// Per shard: the standby's last applied sequence number; the active's newest.
    pub seqs: Vec<LogSeq>,
    pub nonce: Nonce,
}

/// Where one shard's stream starts for an accepted standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardStart {
    /// Send the records after `after` from the backlog.
    Resume { after: LogSeq },
    /// Stream a snapshot of the shard, then the records logged meanwhile.
    FullSync,
}

/// Why an end refuses the other.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RefuseReason {
    #[error("handshake version {theirs}, we speak {ours}")]
    Version { ours: u8, theirs: u8 },
    #[error("peer runs {theirs} shards, we run {ours}")]
    ShardCount { ours: u16, theirs: u16 },
    #[error("peer does not hold the shared secret")]
    WrongSecret,
    #[error("peer's history {theirs} is neither ours nor one we can resume")]
    UnknownHistory { theirs: ReplicationId },
    #[error("active's {theirs} is lower than our {ours}: it is stale")]
    LowerEpoch { ours: Epoch, theirs: Epoch },
    #[error("standby's {theirs} is higher than our {ours}: this active is stale")]
    StaleActive { ours: Epoch, theirs: Epoch },
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// One handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Proof([u8; PROOF_LEN]),
    /// Per shard, in shard order.
    Accept(Vec<ShardStart>),
    Refuse(RefuseReason),
}

/// Why bytes are not a handshake message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    #[error("truncated handshake message")]
    Truncated,
    #[error("unknown handshake message type {0}")]
    UnknownType(u8),
    #[error("bad handshake field: {0}")]
    BadField(&'static str),
    #[error("{0} bytes left over after the handshake message")]
    TrailingBytes(usize),
}

const MSG_HELLO: u8 = 1;
const MSG_PROOF: u8 = 2;
const MSG_ACCEPT: u8 = 3;
const MSG_REFUSE: u8 = 4;

/// Little-endian reader that reports truncation instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        if self.0.len() < n {
            return Err(MessageError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, MessageError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

impl Message {
    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(hello) => {
                out.push(MSG_HELLO);
                out.push(hello.version);
                out.push(match hello.role {
                    Role::Active => 1,
                    Role::Standby => 2,
                });
                out.extend_from_slice(&hello.shard_count.to_le_bytes());
                match hello.history {
                    Some(id) => {
                        out.push(1);
                        out.extend_from_slice(&id.0);
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&hello.epoch.0.to_le_bytes());
                out.extend_from_slice(&(hello.seqs.len() as u16).to_le_bytes());
                for seq in &hello.seqs {
                    out.extend_from_slice(&seq.0.to_le_bytes());
                }
                out.extend_from_slice(&hello.nonce.0);
            }
            Message::Proof(mac) => {
                out.push(MSG_PROOF);
                out.extend_from_slice(mac);
            }
            Message::Accept(plan) => {
                out.push(MSG_ACCEPT);
                out.extend_from_slice(&(plan.len() as u16).to_le_bytes());
                for start in plan {
                    match start {
                        ShardStart::FullSync => out.push(0),
                        ShardStart::Resume { after } => {
                            out.push(1);
                            out.extend_from_slice(&after.0.to_le_bytes());
                        }
                    }
                }
            }
            Message::Refuse(reason) => {
                out.push(MSG_REFUSE);
                match reason {
                    RefuseReason::Version { ours, theirs } => out.extend_from_slice(&[1, *ours, *theirs]),
                    RefuseReason::ShardCount { ours, theirs } => {
                        out.push(2);
                        out.extend_from_slice(&ours.to_le_bytes());
                        out.extend_from_slice(&theirs.to_le_bytes());
                    }
                    RefuseReason::WrongSecret => out.push(3),
                    RefuseReason::UnknownHistory { theirs } => {
                        out.push(4);
                        out.extend_from_slice(&theirs.0);
                    }
                    RefuseReason::LowerEpoch { ours, theirs } | RefuseReason::StaleActive { ours, theirs } => {
                        out.push(if matches!(reason, RefuseReason::LowerEpoch { .. }) { 5 } else { 6 });
                        out.extend_from_slice(&ours.0.to_le_bytes());
                        out.extend_from_slice(&theirs.0.to_le_bytes());
                    }
                    // The static text stays local; the peer learns only that it broke the protocol.
                    RefuseReason::Protocol(_) => out.push(7),
                }
            }
        }
    }

    /// Parses one whole message.
    pub fn decode(bytes: &[u8]) -> Result<Message, MessageError> {
        let mut r = Reader(bytes);
        let message = match r.u8()? {
            MSG_HELLO => {
                let version = r.u8()?;
                let role = match r.u8()? {
                    1 => Role::Active,
                    2 => Role::Standby,
                    _ => return Err(MessageError::BadField("role")),
                };
                let shard_count = r.u16()?;
                let history = match r.u8()? {
                    0 => None,
                    1 => Some(ReplicationId(r.array()?)),
                    _ => return Err(MessageError::BadField("history flag")),
                };
                let epoch = Epoch(r.u64()?);
                let count = usize::from(r.u16()?);
                let mut seqs = Vec::with_capacity(count.min(r.0.len() / 8));
                for _ in 0..count {
                    seqs.push(LogSeq(r.u64()?));
                }
                let nonce = Nonce(r.array()?);
                Message::Hello(Hello { version, role, shard_count, history, epoch, seqs, nonce })
            }
            MSG_PROOF => Message::Proof(r.array()?),
            MSG_ACCEPT => {
                let count = usize::from(r.u16()?);
                let mut plan = Vec::with_capacity(count.min(r.0.len()));
                for _ in 0..count {
                    plan.push(match r.u8()? {
                        0 => ShardStart::FullSync,
                        1 => ShardStart::Resume { after: LogSeq(r.u64()?) },
                        _ => return Err(MessageError::BadField("shard start")),
                    });
                }
                Message::Accept(plan)
            }
            MSG_REFUSE => Message::Refuse(match r.u8()? {
                1 => RefuseReason::Version { ours: r.u8()?, theirs: r.u8()? },
                2 => RefuseReason::ShardCount { ours: r.u16()?, theirs: r.u16()? },
                3 => RefuseReason::WrongSecret,
                4 => RefuseReason::UnknownHistory { theirs: ReplicationId(r.array()?) },
                5 => RefuseReason::LowerEpoch { ours: Epoch(r.u64()?), theirs: Epoch(r.u64()?) },
                6 => RefuseReason::StaleActive { ours: Epoch(r.u64()?), theirs: Epoch(r.u64()?) },
                7 => RefuseReason::Protocol("refused by peer"),
                _ => return Err(MessageError::BadField("refuse reason")),
            }),
            other => return Err(MessageError::UnknownType(other)),
        };
        if !r.0.is_empty() {
            return Err(MessageError::TrailingBytes(r.0.len()));
        }
        Ok(message)
    }
}

/// The proof an end of `role` gives over the transcript of both Hellos.
fn proof(secret: &[u8], role: Role, standby_hello: &Hello, active_hello: &Hello) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(TRANSCRIPT_DOMAIN);
    mac.update(match role {
        Role::Active => b"active proof ",
        Role::Standby => b"standby proof",
    });
    let mut transcript = Vec::new();
    Message::Hello(standby_hello.clone()).encode(&mut transcript);
    Message::Hello(active_hello.clone()).encode(&mut transcript);
    mac.update(&transcript);
    mac
}

fn prove(secret: &[u8], role: Role, standby_hello: &Hello, active_hello: &Hello) -> [u8; PROOF_LEN] {
    proof(secret, role, standby_hello, active_hello).finalize().into_bytes().into()
}

/// Checks a peer's proof in constant time.
fn verify(secret: &[u8], role: Role, standby_hello: &Hello, active_hello: &Hello, given: &[u8]) -> bool {
    proof(secret, role, standby_hello, active_hello).verify_slice(given).is_ok()
}

/// How a handshake ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Replication may start: the standby adopts `history` and `epoch`; each shard starts as `plan` says.
    Accepted { history: ReplicationId, epoch: Epoch, plan: Vec<ShardStart> },
    /// This end refused the peer (and told it so).
    Refused(RefuseReason),
    /// The peer refused this end.
    RefusedByPeer(RefuseReason),
}

/// What to do after one message: send `send` in order; stop if `outcome` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub send: Vec<Message>,
    pub outcome: Option<Outcome>,
}

impl Step {
    fn refuse(mut send: Vec<Message>, reason: RefuseReason, role: Role) -> Step {
        tracing::warn!(?role, %reason, "replication handshake: refusing the peer");
        send.push(Message::Refuse(reason.clone()));
        Step { send, outcome: Some(Outcome::Refused(reason)) }
    }

    fn refused_by_peer(reason: RefuseReason, role: Role) -> Step {
        tracing::warn!(?role, %reason, "replication handshake: refused by the peer");
        Step { send: Vec::new(), outcome: Some(Outcome::RefusedByPeer(reason)) }
    }
}

/// The history an active took over from at its promotion, so the old active's standbys can resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousHistory {
    pub history: ReplicationId,
    /// Per shard: the last sequence number of the previous history this active applied.
    pub until: Vec<LogSeq>,
}

/// What the active knows about itself.
#[derive(Clone, Debug)]
pub struct ActiveConfig {
    pub secret: Vec<u8>,
    pub shard_count: u16,
    pub history: ReplicationId,
    pub epoch: Epoch,
    pub previous: Option<PreviousHistory>,
    /// Per shard: the newest sequence number logged (told to the standby, for its stats).
    pub newest: Vec<LogSeq>,
}

enum ActiveState {
    AwaitHello,
    AwaitProof { standby: Hello, active: Hello },
    Done,
}

/// The active's end of a handshake.
pub struct ActiveHandshake {
    config: ActiveConfig,
    nonce: Nonce,
    state: ActiveState,
}

impl ActiveHandshake {
    /// An active waiting for a standby's Hello; `nonce` must be fresh ([`Nonce::random`]).
    pub fn new(config: ActiveConfig, nonce: Nonce) -> ActiveHandshake {
        ActiveHandshake { config, nonce, state: ActiveState::AwaitHello }
    }

    /// Takes the standby's next message. `can_resume(shard, after)` says whether the shard's backlog
    /// still holds every record after `after` (the shipper asks its log; see `log::LogConsumer::resume_from`);
    /// it is asked only once the standby has proved itself and passed every other check.
    pub fn on_message(&mut self, message: Message, mut can_resume: impl FnMut(ShardId, LogSeq) -> bool) -> Step {
        match (std::mem::replace(&mut self.state, ActiveState::Done), message) {
            (_, Message::Refuse(reason)) => Step::refused_by_peer(reason, Role::Active),
            (ActiveState::AwaitHello, Message::Hello(standby)) => {
                if standby.version != HANDSHAKE_VERSION {
                    let reason = RefuseReason::Version { ours: HANDSHAKE_VERSION, theirs: standby.version };
                    return Step::refuse(Vec::new(), reason, Role::Active);
                }
                if standby.role != Role::Standby {
                    return Step::refuse(Vec::new(), RefuseReason::Protocol("two actives"), Role::Active);
                }
                let active = Hello {
                    version: HANDSHAKE_VERSION,
                    role: Role::Active,
                    shard_count: self.config.shard_count,
                    history: Some(self.config.history),
                    epoch: self.config.epoch,
                    seqs: self.config.newest.clone(),
                    nonce: self.nonce,
                };
                let send = vec![Message::Hello(active.clone())];
                self.state = ActiveState::AwaitProof { standby, active };
                Step { send, outcome: None }
            }
            (ActiveState::AwaitProof { standby, active }, Message::Proof(given)) => {
                let secret = &self.config.secret;
                if !verify(secret, Role::Standby, &standby, &active, &given) {
                    return Step::refuse(Vec::new(), RefuseReason::WrongSecret, Role::Active);
                }
                let send = vec![Message::Proof(prove(secret, Role::Active, &standby, &active))];
                match self.decide(&standby, &mut can_resume) {
                    Ok(plan) => {
                        let (history, epoch) = (self.config.history, self.config.epoch);
                        tracing::info!(%history, %epoch, ?plan, "replication handshake: standby accepted");
                        let mut send = send;
                        send.push(Message::Accept(plan.clone()));
                        let outcome = Outcome::Accepted { history, epoch, plan };
                        Step { send, outcome: Some(outcome) }
                    }
                    Err(reason) => Step::refuse(send, reason, Role::Active),
                }
            }
            _ => Step::refuse(Vec::new(), RefuseReason::Protocol("message out of turn"), Role::Active),
        }
    }

    /// Checks an authenticated standby and plans each shard's start.
    fn decide(
        &self,
        standby: &Hello,
        can_resume: &mut impl FnMut(ShardId, LogSeq) -> bool,
    ) -> Result<Vec<ShardStart>, RefuseReason> {
        let config = &self.config;
        if standby.shard_count != config.shard_count {
            return Err(RefuseReason::ShardCount { ours: config.shard_count, theirs: standby.shard_count });
        }
        if standby.epoch > config.epoch {
            return Err(RefuseReason::StaleActive { ours: config.epoch, theirs: standby.epoch });
        }
        let shards = (0..config.shard_count).map(ShardId);
        let Some(history) = standby.history else {
            return Ok(shards.map(|_| ShardStart::FullSync).collect());
        };
        if standby.seqs.len() != usize::from(config.shard_count) {
            return Err(RefuseReason::Protocol("one applied sequence number per shard"));
        }
        // Up to which point, per shard, the standby's history is also ours.
        let shared_until: Option<&[LogSeq]> = if history == config.history {
            None
        } else {
            match &config.previous {
                Some(previous) if previous.history == history => Some(&previous.until),
                _ => return Err(RefuseReason::UnknownHistory { theirs: history }),
            }
        };
        Ok(shards
            .map(|shard| {
                let after = standby.seqs[shard.index()];
                let shared = match shared_until {
                    None => true,
                    Some(until) => until.get(shard.index()).is_some_and(|&until| after <= until),
                };
                if !shared {
                    // An old active that kept logging after this one took over: what it holds beyond the
                    // takeover point never reached us, so its copy is replaced, not resumed.
                    tracing::warn!(%shard, standby_at = after.0, takeover_at = ?shared_until.and_then(|u| u.get(shard.index())).map(|s| s.0),
                        "the peer holds records of the previous history beyond the takeover point (writes this active never got): full sync");
                }
                if shared && can_resume(shard, after) {
                    ShardStart::Resume { after }
                } else {
                    ShardStart::FullSync
                }
            })
            .collect())
    }
}

/// What the standby knows about itself.
#[derive(Clone, Debug)]
pub struct StandbyConfig {
    pub secret: Vec<u8>,
    pub shard_count: u16,
    /// The history its data belongs to; `None` when it has nothing usable (it asks for a full sync).
    pub history: Option<ReplicationId>,
    pub epoch: Epoch,
    /// Per shard: the last applied sequence number.
    pub applied: Vec<LogSeq>,
}

enum StandbyState {
    AwaitHello { standby: Hello },
    AwaitProof { standby: Hello, active: Hello },
    AwaitVerdict { active: Hello },
    Done,
}

/// The standby's end of a handshake (the end that connects).
pub struct StandbyHandshake {
    config: StandbyConfig,
    state: StandbyState,
    /// The epoch of the active once it proved it holds the secret.
    proven_epoch: Option<Epoch>,
}

impl StandbyHandshake {
    /// Starts a handshake; returns the machine and the Hello to send. `nonce` must be fresh.
    pub fn start(config: StandbyConfig, nonce: Nonce) -> (StandbyHandshake, Message) {
        let hello = Hello {
            version: HANDSHAKE_VERSION,
            role: Role::Standby,
            shard_count: config.shard_count,
            history: config.history,
            epoch: config.epoch,
            seqs: config.applied.clone(),
            nonce,
        };
        let message = Message::Hello(hello.clone());
        (StandbyHandshake { config, state: StandbyState::AwaitHello { standby: hello }, proven_epoch: None }, message)
    }

    /// The epoch the active claimed, once it proved it holds the secret (a refusal after that comes
    /// from a genuine member of the pair).
    pub fn proven_active_epoch(&self) -> Option<Epoch> {
        self.proven_epoch
    }

    /// Takes the active's next message.
    pub fn on_message(&mut self, message: Message) -> Step {
        match (std::mem::replace(&mut self.state, StandbyState::Done), message) {
            (_, Message::Refuse(reason)) => Step::refused_by_peer(reason, Role::Standby),
            (StandbyState::AwaitHello { standby }, Message::Hello(active)) => {
                if active.version != HANDSHAKE_VERSION {
                    let reason = RefuseReason::Version { ours: HANDSHAKE_VERSION, theirs: active.version };
                    return Step::refuse(Vec::new(), reason, Role::Standby);
                }
                if active.role != Role::Active || active.history.is_none() {
                    return Step::refuse(Vec::new(), RefuseReason::Protocol("peer is not an active"), Role::Standby);
                }
                let proof = prove(&self.config.secret, Role::Standby, &standby, &active);
                self.state = StandbyState::AwaitProof { standby, active };
                Step { send: vec![Message::Proof(proof)], outcome: None }
            }
            (StandbyState::AwaitProof { standby, active }, Message::Proof(given)) => {
                if !verify(&self.config.secret, Role::Active, &standby, &active, &given) {
                    return Step::refuse(Vec::new(), RefuseReason::WrongSecret, Role::Standby);
                }
                if active.shard_count != self.config.shard_count {
                    let reason = RefuseReason::ShardCount { ours: self.config.shard_count, theirs: active.shard_count };
                    return Step::refuse(Vec::new(), reason, Role::Standby);
                }
                if active.epoch < self.config.epoch {
                    let reason = RefuseReason::LowerEpoch { ours: self.config.epoch, theirs: active.epoch };
                    return Step::refuse(Vec::new(), reason, Role::Standby);
                }
                self.proven_epoch = Some(active.epoch);
                self.state = StandbyState::AwaitVerdict { active };
                Step::default()
            }
            (StandbyState::AwaitVerdict { active }, Message::Accept(plan)) => {
                if plan.len() != usize::from(self.config.shard_count) {
                    return Step::refuse(Vec::new(), RefuseReason::Protocol("a start per shard"), Role::Standby);
                }
                let consistent = plan.iter().zip(&self.config.applied).all(|(start, &applied)| match start {
                    ShardStart::Resume { after } => self.config.history.is_some() && *after == applied,
                    ShardStart::FullSync => true,
                });
                if !consistent {
                    let reason = RefuseReason::Protocol("resume from a point we never applied");
                    return Step::refuse(Vec::new(), reason, Role::Standby);
                }
                let history = active.history.expect("checked at Hello");
                let epoch = active.epoch;
                tracing::info!(%history, %epoch, ?plan, "replication handshake: accepted by the active");
                Step { send: Vec::new(), outcome: Some(Outcome::Accepted { history, epoch, plan }) }
            }
            _ => Step::refuse(Vec::new(), RefuseReason::Protocol("message out of turn"), Role::Standby),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    const HISTORY: ReplicationId = ReplicationId([7; 20]);

    fn active(epoch: u64) -> ActiveConfig {
        ActiveConfig {
            secret: b"pair secret".to_vec(),
            shard_count: 4,
            history: HISTORY,
            epoch: Epoch(epoch),
            previous: None,
            newest: vec![LogSeq(100); 4],
        }
    }

    fn standby(history: Option<ReplicationId>, epoch: u64) -> StandbyConfig {
        StandbyConfig {
            secret: b"pair secret".to_vec(),
            shard_count: 4,
            history,
            epoch: Epoch(epoch),
            applied: vec![LogSeq(90), LogSeq(10), LogSeq(90), LogSeq(0)],
        }
    }

    /// Every shard's backlog holds records after 50 onwards.
    fn backlog_from_50(_: ShardId, after: LogSeq) -> bool {
        after >= LogSeq(50)
    }

    /// Runs both ends against each other, every message through its wire form; returns both outcomes.
    fn run(
        standby: StandbyConfig,
        active: ActiveConfig,
        can_resume: fn(ShardId, LogSeq) -> bool,
    ) -> (Option<Outcome>, Option<Outcome>) {
        let wire = |message: Message| {
            let mut bytes = Vec::new();
            message.encode(&mut bytes);
            Message::decode(&bytes).expect("a message we encoded decodes")
        };
        let (mut standby, hello) = StandbyHandshake::start(standby, Nonce([1; NONCE_LEN]));
        let mut active = ActiveHandshake::new(active, Nonce([2; NONCE_LEN]));
        let mut to_active = VecDeque::from([hello]);
        let mut to_standby = VecDeque::new();
        let (mut standby_outcome, mut active_outcome) = (None, None);
        while !(to_active.is_empty() && to_standby.is_empty()) {
            if let Some(message) = to_active.pop_front() {
                if active_outcome.is_none() {
                    let step = active.on_message(wire(message), can_resume);
                    to_standby.extend(step.send);
                    active_outcome = step.outcome;
                }
            }
            if let Some(message) = to_standby.pop_front() {
                if standby_outcome.is_none() {
                    let step = standby.on_message(wire(message));
                    to_active.extend(step.send);
                    standby_outcome = step.outcome;
                }
            }
        }
        (standby_outcome, active_outcome)
    }

    fn accepted(plan: Vec<ShardStart>, epoch: u64) -> Option<Outcome> {
        Some(Outcome::Accepted { history: HISTORY, epoch: Epoch(epoch), plan })
    }

    #[test]
    fn a_standby_with_no_history_gets_a_full_sync() {
        let plan = vec![ShardStart::FullSync; 4];
        assert_eq!(run(standby(None, 0), active(3), backlog_from_50), (accepted(plan.clone(), 3), accepted(plan, 3)));
    }

    #[test]
    fn the_backlog_decides_resume_or_full_sync_per_shard() {
        let plan = vec![
            ShardStart::Resume { after: LogSeq(90) },
            ShardStart::FullSync,
            ShardStart::Resume { after: LogSeq(90) },
            ShardStart::FullSync,
        ];
        let outcome = run(standby(Some(HISTORY), 3), active(3), backlog_from_50);
        assert_eq!(outcome, (accepted(plan.clone(), 3), accepted(plan, 3)));
        let all = vec![
            ShardStart::Resume { after: LogSeq(90) },
            ShardStart::Resume { after: LogSeq(10) },
            ShardStart::Resume { after: LogSeq(90) },
            ShardStart::Resume { after: LogSeq(0) },
        ];
        assert_eq!(run(standby(Some(HISTORY), 3), active(3), |_, _| true).0, accepted(all, 3));
    }

    #[test]
    fn a_standby_with_a_lower_epoch_is_accepted_and_adopts_the_active_one() {
        // The old active rejoining after a failover.
        let (standby_outcome, _) = run(standby(Some(HISTORY), 2), active(3), |_, _| true);
        assert!(matches!(standby_outcome, Some(Outcome::Accepted { epoch: Epoch(3), .. })));
    }

    #[test]
    fn standbys_of_the_previous_history_resume_up_to_the_takeover_point() {
        let old = ReplicationId([9; 20]);
        let mut config = active(4);
        config.previous = Some(PreviousHistory { history: old, until: vec![LogSeq(95), LogSeq(95), LogSeq(80), LogSeq(95)] });
        let (_, active_outcome) = run(standby(Some(old), 3), config, |_, _| true);
        let plan = vec![
            ShardStart::Resume { after: LogSeq(90) },
            ShardStart::Resume { after: LogSeq(10) },
            ShardStart::FullSync, // applied 90 of the old history, but the takeover happened at 80
            ShardStart::Resume { after: LogSeq(0) },
        ];
        assert_eq!(active_outcome, accepted(plan, 4));
    }

    #[test]
    fn a_wrong_secret_is_refused_by_the_active() {
        let mut bad = standby(Some(HISTORY), 3);
        bad.secret = b"guess".to_vec();
        let refused = RefuseReason::WrongSecret;
        assert_eq!(
            run(bad, active(3), |_, _| true),
            (Some(Outcome::RefusedByPeer(refused.clone())), Some(Outcome::Refused(refused)))
        );
    }

    #[test]
    fn an_active_that_cannot_prove_itself_is_refused_by_the_standby() {
        let (mut standby, _) = StandbyHandshake::start(standby(Some(HISTORY), 3), Nonce([1; NONCE_LEN]));
        let impostor = Hello {
            version: HANDSHAKE_VERSION,
            role: Role::Active,
            shard_count: 4,
            history: Some(HISTORY),
            epoch: Epoch(3),
            seqs: vec![],
            nonce: Nonce([3; NONCE_LEN]),
        };
        let step = standby.on_message(Message::Hello(impostor));
        let Message::Proof(standby_proof) = step.send[0] else { panic!("no proof") };
        // Reflecting the standby's own proof back does not pass for the active's.
        let step = standby.on_message(Message::Proof(standby_proof));
        assert_eq!(step.outcome, Some(Outcome::Refused(RefuseReason::WrongSecret)));
        assert_eq!(standby.proven_active_epoch(), None, "an impostor's epoch is never taken as proven");
        assert_eq!(step.send, vec![Message::Refuse(RefuseReason::WrongSecret)]);
    }

    #[test]
    fn another_shard_count_is_refused_by_both_ends() {
        let mut other = standby(None, 0);
        other.shard_count = 8;
        other.applied = vec![LogSeq::ZERO; 8];
        let reason_at_active = RefuseReason::ShardCount { ours: 4, theirs: 8 };
        let reason_at_standby = RefuseReason::ShardCount { ours: 8, theirs: 4 };
        assert_eq!(
            run(other, active(3), |_, _| true),
            (Some(Outcome::Refused(reason_at_standby)), Some(Outcome::Refused(reason_at_active)))
        );
    }

    #[test]
    fn a_history_the_active_cannot_resume_is_refused() {
        let stranger = ReplicationId([5; 20]);
        let reason = RefuseReason::UnknownHistory { theirs: stranger };
        assert_eq!(
            run(standby(Some(stranger), 3), active(3), |_, _| true),
            (Some(Outcome::RefusedByPeer(reason.clone())), Some(Outcome::Refused(reason)))
        );
    }

    #[test]
    fn a_refusal_after_the_active_proved_itself_carries_its_epoch() {
        // A restarted active refuses the history it forgot: the standby learns that an authenticated
        // active of which epoch did so (what decides whether it takes over).
        let stranger = ReplicationId([5; 20]);
        let (mut standby, hello) = StandbyHandshake::start(standby(Some(stranger), 3), Nonce([1; NONCE_LEN]));
        let mut active = ActiveHandshake::new(active(3), Nonce([2; NONCE_LEN]));
        let mut to_active = vec![hello];
        let mut outcome = None;
        while let Some(message) = to_active.pop() {
            let step = active.on_message(message, |_, _| true);
            for reply in step.send {
                if matches!(reply, Message::Hello(_) | Message::Proof(_)) {
                    assert_eq!(standby.proven_active_epoch(), None, "nothing proven before the active's proof");
                }
                let step = standby.on_message(reply);
                to_active.extend(step.send);
                outcome = outcome.or(step.outcome);
            }
        }
        assert_eq!(outcome, Some(Outcome::RefusedByPeer(RefuseReason::UnknownHistory { theirs: stranger })));
        assert_eq!(standby.proven_active_epoch(), Some(Epoch(3)));
    }

    #[test]
    fn an_active_with_a_lower_epoch_is_refused() {
        let (standby_outcome, active_outcome) = run(standby(Some(HISTORY), 5), active(3), |_, _| true);
        assert_eq!(standby_outcome, Some(Outcome::Refused(RefuseReason::LowerEpoch { ours: Epoch(5), theirs: Epoch(3) })));
        assert_eq!(active_outcome, Some(Outcome::Refused(RefuseReason::StaleActive { ours: Epoch(3), theirs: Epoch(5) })));
    }

    #[test]
    fn another_version_and_messages_out_of_turn_are_refused() {
        let mut active_end = ActiveHandshake::new(active(3), Nonce([2; NONCE_LEN]));
        let step = active_end.on_message(Message::Proof([0; PROOF_LEN]), |_, _| true);
        assert!(matches!(step.outcome, Some(Outcome::Refused(RefuseReason::Protocol(_)))));

        let (_, hello) = StandbyHandshake::start(standby(None, 0), Nonce([1; NONCE_LEN]));
        let Message::Hello(mut hello) = hello else { panic!() };
        hello.version = 9;
        let mut active_end = ActiveHandshake::new(active(3), Nonce([2; NONCE_LEN]));
        let step = active_end.on_message(Message::Hello(hello), |_, _| true);
        assert_eq!(step.outcome, Some(Outcome::Refused(RefuseReason::Version { ours: 1, theirs: 9 })));

        let (mut standby_end, _) = StandbyHandshake::start(standby(None, 0), Nonce([1; NONCE_LEN]));
        let step = standby_end.on_message(Message::Accept(vec![ShardStart::FullSync; 4]));
        assert!(matches!(step.outcome, Some(Outcome::Refused(RefuseReason::Protocol(_)))), "accept before proof");
    }

    #[test]
    fn the_backlog_is_asked_only_after_the_standby_proved_itself() {
        let mut bad = standby(Some(HISTORY), 3);
        bad.secret = b"guess".to_vec();
        let _ = run(bad, active(3), |_, _| panic!("asked the backlog for an unauthenticated peer"));
    }

    fn any_message() -> impl Strategy<Value = Message> {
        let id = any::<[u8; 20]>().prop_map(ReplicationId);
        let hello = (any::<u8>(), any::<bool>(), any::<u16>(), proptest::option::of(id.clone()), any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..8), any::<[u8; 32]>())
            .prop_map(|(version, active, shard_count, history, epoch, seqs, nonce)| Message::Hello(Hello {
                version,
                role: if active { Role::Active } else { Role::Standby },
                shard_count,
                history,
                epoch: Epoch(epoch),
                seqs: seqs.into_iter().map(LogSeq).collect(),
                nonce: Nonce(nonce),
            }));
        let start = prop_oneof![Just(ShardStart::FullSync), any::<u64>().prop_map(|a| ShardStart::Resume { after: LogSeq(a) })];
        let reason = prop_oneof![
            (any::<u8>(), any::<u8>()).prop_map(|(ours, theirs)| RefuseReason::Version { ours, theirs }),
            (any::<u16>(), any::<u16>()).prop_map(|(ours, theirs)| RefuseReason::ShardCount { ours, theirs }),
            Just(RefuseReason::WrongSecret),
            id.prop_map(|theirs| RefuseReason::UnknownHistory { theirs }),
            (any::<u64>(), any::<u64>()).prop_map(|(o, t)| RefuseReason::LowerEpoch { ours: Epoch(o), theirs: Epoch(t) }),
            (any::<u64>(), any::<u64>()).prop_map(|(o, t)| RefuseReason::StaleActive { ours: Epoch(o), theirs: Epoch(t) }),
            Just(RefuseReason::Protocol("refused by peer")),
        ];
        prop_oneof![
            hello,
            any::<[u8; 32]>().prop_map(Message::Proof),
            proptest::collection::vec(start, 0..8).prop_map(Message::Accept),
            reason.prop_map(Message::Refuse),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(message in any_message()) {
            let mut bytes = Vec::new();
            message.encode(&mut bytes);
            prop_assert_eq!(Message::decode(&bytes), Ok(message));
            for cut in 0..bytes.len() {
                prop_assert!(Message::decode(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(message) = Message::decode(&bytes) {
                let mut active_end = ActiveHandshake::new(active(3), Nonce([2; NONCE_LEN]));
                let _ = active_end.on_message(message.clone(), |_, _| true);
                let (mut standby_end, _) = StandbyHandshake::start(standby(None, 0), Nonce([1; NONCE_LEN]));
                let _ = standby_end.on_message(message);
            }
        }
    }
}
