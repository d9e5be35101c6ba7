//! A planned handover (switchover) between an active and one of its standbys, over the replication
//! link: the active's side of the request and the rules both ends apply.
//!
//! The server pauses client writes on the active first, so every shard's log ends at a known
//! sequence number (`through`). Then:
//! 1. the server asks the shipper through a [`HandoverSlot`] ([`HandoverSlot::request`]);
//! 2. the shipper waits until a standby streaming every shard has acknowledged (applied) every shard
//!    through `through` ([`pick_standby`]), and sends it `Handover{epoch, through}`
//!    ([`crate::wire::encode_handover`]);
//! 3. the standby checks that what it received and applied ends exactly there ([`standby_verdict`]),
//!    answers `HandoverReply`, and if it accepted, leaves the stream and promotes itself;
//! 4. the slot ends [`HandoverState::Accepted`] (the server demotes the old active to a standby of
//!    the new one, resuming from `through`), or [`HandoverState::Refused`] / [`HandoverState::Failed`]
//!    (nothing was handed over: the server resumes writes on the old active), or
//!    [`HandoverState::Unknown`] (sent, but the standby went away without answering).
//!
//! Every wait is bounded: by the request's deadline while no standby has caught up, and by
//! [`ANSWER_TIMEOUT`] for the answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ids::LogSeq;

/// How long the shipper waits for a standby's answer once the handover is sent.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a handover stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandoverState {
    Idle,
    /// Hand over once a standby has applied every shard through `through`; give up at `deadline`.
    Wanted { through: Vec<LogSeq>, deadline: Instant },
    /// Sent to `addr`; its answer is awaited until `deadline`.
    Sent { addr: SocketAddr, deadline: Instant },
    /// `addr` takes over.
    Accepted { addr: SocketAddr },
    /// `addr` declined; nothing was handed over.
    Refused { addr: SocketAddr, reason: String },
    /// No standby caught up in time (or the log moved past `through`); nothing was handed over.
    Failed { reason: String },
    /// Sent to `addr`, which went away or stayed silent: it may be promoting, or not.
    Unknown { addr: SocketAddr, reason: String },
}

impl HandoverState {
    /// Whether the handover ended (the shipper no longer works on it).
    pub fn ended(&self) -> bool {
        !matches!(self, HandoverState::Wanted { .. } | HandoverState::Sent { .. })
    }
}

/// The meeting point of the server (which requests a handover and waits for its end) and the
/// shipper (which carries it out). The shipper looks at it only while [`HandoverSlot::busy`].
#[derive(Debug)]
pub struct HandoverSlot {
    busy: AtomicBool,
    state: Mutex<HandoverState>,
}

impl Default for HandoverSlot {
    fn default() -> Self {
        HandoverSlot { busy: AtomicBool::new(false), state: Mutex::new(HandoverState::Idle) }
    }
}

impl HandoverSlot {
    /// Asks for a handover at `through` (the last sequence number of every shard), to be given up at
    /// `deadline` if no standby has caught up by then. Ring the shipper's bell after this.
    pub fn request(&self, through: Vec<LogSeq>, deadline: Instant) {
        *self.state.lock().unwrap() = HandoverState::Wanted { through, deadline };
        self.busy.store(true, Ordering::Release);
    }

    /// Where the handover stands.
    pub fn state(&self) -> HandoverState {
        self.state.lock().unwrap().clone()
    }

    /// Whether the shipper has work here.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// The shipper's side: runs `step` on the state and stores what it returns; an ended state clears
    /// [`HandoverSlot::busy`].
    pub fn update(&self, step: impl FnOnce(&HandoverState) -> Option<HandoverState>) {
        let mut state = self.state.lock().unwrap();
        if let Some(next) = step(&state) {
            *state = next;
        }
        if state.ended() {
            self.busy.store(false, Ordering::Release);
        }
    }
}

/// What the shipper knows of one standby, for [`pick_standby`].
#[derive(Clone, Debug)]
pub struct Candidate {
    pub addr: SocketAddr,
    /// Past the handshake, and every shard streaming (none in a full sync).
    pub streaming: bool,
    /// Per shard, the highest sequence number it acknowledged (applied).
    pub acked: Vec<LogSeq>,
}

/// The first standby that has applied every shard through `through`, if any.
pub fn pick_standby(candidates: &[Candidate], through: &[LogSeq]) -> Option<usize> {
    candidates.iter().position(|c| c.streaming && c.acked.len() == through.len() && c.acked.iter().zip(through).all(|(a, t)| a >= t))
}

/// How far the best standby is, for a failed handover's reason: "acked 5,7 of 9,7".
pub fn progress(candidates: &[Candidate], through: &[LogSeq]) -> String {
    let list = |seqs: &[LogSeq]| seqs.iter().map(|s| s.0.to_string()).collect::<Vec<_>>().join(",");
    let best = candidates.iter().filter(|c| c.streaming).max_by_key(|c| c.acked.iter().zip(through).filter(|(a, t)| a >= t).count());
    match best {
        Some(c) => format!("the best standby, {}, had applied {} of {}", c.addr, list(&c.acked), list(through)),
        None if candidates.is_empty() => "no standby is connected".to_string(),
        None => "no standby is streaming every shard".to_string(),
    }
}

/// The standby's decision on a handover at `through`: Ok when it can take over, having received and
/// applied exactly through `through` on every shard; otherwise why not.
pub fn standby_verdict(can_promote: bool, received: &[LogSeq], applied: &[LogSeq], through: &[LogSeq]) -> Result<(), String> {
    if !can_promote {
        return Err("this standby has no [failover] table: it cannot take over the service address".to_string());
    }
    if through.len() != received.len() {
        return Err(format!("the handover names {} shards; this standby has {}", through.len(), received.len()));
    }
    for (shard, ((&got, &done), &last)) in received.iter().zip(applied).zip(through).enumerate() {
        if got != last {
            return Err(format!("shard {shard}: received through {}, but the active's log ends at {}", got.0, last.0));
        }
        if done != last {
            return Err(format!("shard {shard}: applied through {} of {}", done.0, last.0));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(values: &[u64]) -> Vec<LogSeq> {
        values.iter().copied().map(LogSeq).collect()
    }

    fn candidate(port: u16, streaming: bool, acked: &[u64]) -> Candidate {
        Candidate { addr: SocketAddr::from(([127, 0, 0, 1], port)), streaming, acked: seqs(acked) }
    }

    #[test]
    fn the_first_standby_caught_up_on_every_shard_is_picked() {
        let through = seqs(&[9, 7]);
        let candidates = [candidate(1, true, &[9, 6]), candidate(2, false, &[9, 7]), candidate(3, true, &[9, 7]), candidate(4, true, &[9, 7])];
        assert_eq!(pick_standby(&candidates, &through), Some(2));
        assert_eq!(pick_standby(&candidates[..2], &through), None, "behind on a shard, or not streaming every shard");
        assert!(progress(&candidates[..2], &through).contains("127.0.0.1:1, had applied 9,6 of 9,7"));
        assert_eq!(progress(&[], &through), "no standby is connected");
    }

    #[test]
    fn a_standby_takes_over_only_when_it_holds_exactly_the_actives_log() {
        let through = seqs(&[5, 3]);
        assert_eq!(standby_verdict(true, &through, &through, &through), Ok(()));
        assert!(standby_verdict(false, &through, &through, &through).unwrap_err().contains("no [failover]"));
        assert!(standby_verdict(true, &seqs(&[5, 4]), &seqs(&[5, 4]), &through).unwrap_err().contains("shard 1: received through 4"));
        assert!(standby_verdict(true, &through, &seqs(&[5, 2]), &through).unwrap_err().contains("shard 1: applied through 2 of 3"));
        assert!(standby_verdict(true, &seqs(&[5]), &seqs(&[5]), &through).is_err());
    }

    #[test]
    fn the_slot_is_busy_until_the_handover_ends() {
        let slot = HandoverSlot::default();
        assert!(!slot.busy());
        slot.request(seqs(&[1]), Instant::now());
        assert!(slot.busy());
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        slot.update(|_| Some(HandoverState::Sent { addr, deadline: Instant::now() }));
        assert!(slot.busy());
        slot.update(|_| Some(HandoverState::Accepted { addr }));
        assert!(!slot.busy());
        assert_eq!(slot.state(), HandoverState::Accepted { addr });
    }
}
