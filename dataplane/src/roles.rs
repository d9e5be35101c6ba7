//! Role changes on demand, as an operator asks for them with `tandemctl` (through [`crate::admin`]).
//!
//! - [`status`]: the node's role, epoch, history, log positions, peers and service address, as
//!   `key value` pairs.
//! - [`promote`]: a standby becomes the active now (what a failover does, on demand).
//! - [`demote`]: an active steps down to standby: writes stop, the service address goes, and a standby
//!   with failover takes over after `dead_after` as it would after a failure.
//! - [`switchover`]: a planned swap with no acknowledged write lost. Run on the active:
//!   1. writes are paused: held unanswered in their connections, not refused ([`pause`] waits until
//!      every worker has moved past the pause and each shard's log has stopped at `through`);
//!   2. the shipper hands over to the first standby that has applied every shard through `through`
//!      ([`replica::handover`]); that standby checks it holds exactly that, answers, and promotes
//!      itself (epoch + 1, the service address claimed and announced, its log continuing the history);
//!   3. this node steps down to a standby of it, presenting its history and `through`, so it resumes
//!      with a partial resync. The new active claimed and announced the service address before it
//!      could be seen as active; this node then closes the connections of the writes it held (they were
//!      never run), and of any write for a second more, while it still has the address, and releases
//!      it. Clients see their connection closed and reconnect, to the new active: no error reply.
//!
//! If no standby catches up before the timeout, or the chosen one refuses, nothing was handed over:
//! the pause ends and the held writes run here, on the active.
//!
//! One role change runs at a time ([`NodeState`]'s `changing` lock); every one is logged with its
//! reason and counted in `stats replication`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replica::handover::{HandoverState, ANSWER_TIMEOUT};
use replica::port::Wake;
use replica::LogSeq;

use crate::replication::{NodeState, Report, StepDown};

/// What an operator's request answers: a message for the operator, or why it was not done.
pub type Outcome = Result<String, String>;

/// The longest switchover timeout accepted.
pub const SWITCHOVER_TIMEOUT_MAX: Duration = Duration::from_secs(60);
/// How long `promote` waits for the replication thread to finish promoting.
const PROMOTE_WAIT: Duration = Duration::from_secs(5);
/// How long a switchover looks for the new active once the standby accepted.
const NEW_ACTIVE_WAIT: Duration = Duration::from_secs(3);

fn list(seqs: &[LogSeq]) -> String {
    seqs.iter().map(|s| s.0.to_string()).collect::<Vec<_>>().join(",")
}

/// The node's state as `key value` pairs, for `tandemctl status`.
pub fn status(state: &NodeState) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut push = |key: &str, value: String| out.push((key.to_string(), value));
    match state.report() {
        Report::Active { history, epoch, report } => {
            let r = report.lock().unwrap();
            push("role", "active".into());
            push("epoch", epoch.0.to_string());
            push("replication_id", history.to_string());
            push("log_positions", list(&state.marks.logged()));
            push("listen", r.listen.clone());
            push("standbys", r.peers.len().to_string());
            for (i, peer) in r.peers.iter().enumerate() {
                let acked = peer.acked.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
                push(&format!("standby_{i}"), format!("{} {} acked {acked} lag_records {}", peer.addr, peer.state, peer.lag_records));
            }
        }
        Report::Standby { report } => {
            let r = report.lock().unwrap();
            push("role", "standby".into());
            push("epoch", r.epoch.0.to_string());
            push("replication_id", r.history.map_or_else(|| "none".to_string(), |h| h.to_string()));
            push("applied", r.applied.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
            push("active", if r.active.is_empty() { "none".to_string() } else { r.active.clone() });
            push("link", r.state.to_string());
            push("last_heard_ms", r.last_heard_millis.to_string());
        }
    }
    push("writable", if state.writable() { "yes" } else { "no" }.into());
    push("writes_paused", if state.writes_held() { "yes" } else { "no" }.into());
    match &state.promotion {
        Some(promotion) => {
            let failover = &promotion.failover;
            push("stored_epoch", promotion.epochs.load().map_or_else(|e| format!("unreadable: {e}"), |e| e.0.to_string()));
            let held = if crate::failover::holds_service_address(failover) { "held by this node" } else { "not on this node" };
            let place = if failover.stack.is_some() { "the userspace stacks".to_string() } else { failover.interface.clone() };
            push("service_ip", format!("{}/{} on {place}: {held}", failover.service_ip, failover.prefix_len));
        }
        None => push("service_ip", "none (no [failover] table)".into()),
    }
    let counts = &state.counts;
    let changes = state.changes();
    push("role_changes", changes.len().to_string());
    push("promotions", counts.promotions.load(Ordering::Relaxed).to_string());
    push("step_downs", counts.step_downs.load(Ordering::Relaxed).to_string());
    push("switchovers", counts.switchovers.load(Ordering::Relaxed).to_string());
    push("switchovers_aborted", counts.switchovers_aborted.load(Ordering::Relaxed).to_string());
    push("last_role_change", changes.last().cloned().unwrap_or_else(|| "none".into()));
    push("promotions_declined", counts.promotions_declined.load(Ordering::Relaxed).to_string());
    push("last_promotion_declined", state.last_declined().unwrap_or_else(|| "none".into()));
    out
}

/// Makes a standby the active now. Refused on an active, without failover settings, and while an
/// active is connected to this standby unless `force` (the operator's word that it is not serving).
pub fn promote(state: &Arc<NodeState>, force: bool) -> Outcome {
    let _one = state.changing.try_lock().map_err(|_| "another role change is under way".to_string())?;
    state.promotion.as_ref().ok_or("this node has no [failover] table: no service address or state directory to promote with")?;
    match state.report() {
        Report::Active { epoch, .. } => return Err(format!("already the active (at {epoch})")),
        Report::Standby { report } => {
            let r = report.lock().unwrap().clone();
            if r.state != "connecting" && !force {
                return Err(format!(
                    "the active {} (at epoch {}) is connected to this standby ({}); run `tandemctl switchover` on it for a swap \
                     without loss, or `promote --force` if it must be replaced anyway",
                    r.active, r.epoch.0, r.state
                ));
            }
        }
    }
    let (flag, bell) = state.control.lock().unwrap().promote.clone().ok_or("this standby has no receiver to promote")?;
    flag.store(true, Ordering::SeqCst);
    bell.ring_always();
    let deadline = Instant::now() + PROMOTE_WAIT;
    while Instant::now() < deadline {
        if let Report::Active { epoch, .. } = state.report() {
            if state.writable() {
                return Ok(format!("promoted to active at {epoch}{}", if force { " (forced)" } else { "" }));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    flag.store(false, Ordering::SeqCst);
    Err(format!("not promoted within {} s; see the log", PROMOTE_WAIT.as_secs()))
}

/// Steps an active down to standby.
pub fn demote(state: &Arc<NodeState>) -> Outcome {
    let _one = state.changing.try_lock().map_err(|_| "another role change is under way".to_string())?;
    let promotion = state.promotion.as_ref().ok_or("this node has no [failover] table: demote moves the service address")?;
    let Report::Active { history, epoch, .. } = state.report() else { return Err("already a standby".into()) };
    let reign = state.reign.load(Ordering::SeqCst);
    let started = Instant::now();
    let through = match pause(state, &*promotion.wake, started + Duration::from_secs(5)) {
        Ok(through) => through,
        Err(e) => {
            state.hold_writes(false, &*promotion.wake);
            return Err(format!("not demoted: {e}; writes resumed"));
        }
    };
    let why = format!("demoted by tandemctl: stepped down to standby at {epoch}, log ending at {}", list(&through));
    let plan = StepDown { epoch, persist: false, resume: Some((history, through)), assume_synced: false, close_held: true, why };
    if !promotion.step_down(state, reign, plan) {
        return Err("this node stepped down meanwhile (it met a newer active)".into());
    }
    Ok(format!(
        "demoted to standby at {epoch}; the service address is released; a standby with failover takes over after dead_after ({} ms)",
        promotion.settings.dead_after.map_or(0, |d| d.as_millis())
    ))
}

/// A planned swap with a standby (run on the active); see the module's description.
pub fn switchover(state: &Arc<NodeState>, timeout: Duration) -> Outcome {
    let _one = state.changing.try_lock().map_err(|_| "another role change is under way".to_string())?;
    let promotion = state.promotion.as_ref().ok_or("this node has no [failover] table: a switchover moves the service address")?;
    let Report::Active { history, epoch, report } = state.report() else {
        return Err("this node is a standby: run switchover on the active".into());
    };
    if !report.lock().unwrap().peers.iter().any(|p| p.state == "streaming") {
        return Err("no standby is streaming from this active: there is nobody to hand over to".into());
    }
    let (slot, bell) = state.control.lock().unwrap().handover.clone().ok_or("this active does not ship to standbys")?;
    let wake = &*promotion.wake;
    let reign = state.reign.load(Ordering::SeqCst);
    let started = Instant::now();
    let deadline = started + timeout.min(SWITCHOVER_TIMEOUT_MAX);
    let abort = |why: String| -> Outcome {
        state.hold_writes(false, wake);
        state.counts.switchovers_aborted.fetch_add(1, Ordering::Relaxed);
        let message = format!("switchover aborted after {} ms: {why}; writes resumed on this active", started.elapsed().as_millis());
        state.note(message.clone());
        Err(message)
    };
    let through = match pause(state, wake, deadline) {
        Ok(through) => through,
        Err(e) => return abort(e),
    };
    tracing::info!(through = %list(&through), "switchover: writes paused; handing over");
    slot.request(through.clone(), deadline);
    bell.ring_always();
    let outcome = loop {
        let now = slot.state();
        if now.ended() {
            break now;
        }
        if Instant::now() > deadline + ANSWER_TIMEOUT + Duration::from_secs(1) {
            break HandoverState::Failed { reason: "the replication thread did not carry the handover out".into() };
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let found = |wait: Duration| {
        let until = Instant::now() + wait;
        let shards = promotion.shard_count();
        loop {
            let patience = Duration::from_millis(300);
            let found = replica::receiver::probe_for_active(&promotion.settings.peers, &promotion.settings.secret, shards, epoch, patience);
            if let Some(found) = found.filter(|f| f.epoch > epoch) {
                return Some(found);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (to, new_active) = match outcome {
        HandoverState::Accepted { addr } => (addr, found(NEW_ACTIVE_WAIT)),
        HandoverState::Unknown { addr, reason } => match found(Duration::from_secs(2)) {
            Some(active) => (addr, Some(active)),
            None => return abort(format!("{reason} ({addr}), and no newer active appeared")),
        },
        HandoverState::Refused { addr, reason } => return abort(format!("{addr} refused the handover: {reason}")),
        HandoverState::Failed { reason } => return abort(reason),
        HandoverState::Idle | HandoverState::Wanted { .. } | HandoverState::Sent { .. } => return abort("the handover never ended".into()),
    };
    let new_epoch = new_active.map_or(epoch.next(), |f| f.epoch);
    let seen = match new_active {
        Some(active) => format!("{} is the active at {}", active.addr, active.epoch),
        None => format!("{to} accepted but was not seen as active within {} s", NEW_ACTIVE_WAIT.as_secs()),
    };
    let why = format!(
        "switchover: stepped down to standby, handed over to {to} with the log at {} ({seen}); follows it from there; writes paused {} ms",
        list(&through),
        started.elapsed().as_millis()
    );
    let plan = StepDown { epoch: new_epoch, persist: true, resume: Some((history, through)), assume_synced: true, close_held: true, why: why.clone() };
    if !promotion.step_down(state, reign, plan) {
        return Err("handed over, but this node had stepped down meanwhile".into());
    }
    state.counts.switchovers.fetch_add(1, Ordering::Relaxed);
    Ok(format!("switchover complete in {} ms: {seen}; this node is its standby", started.elapsed().as_millis()))
}

/// Pauses writes and waits until every worker has moved past the pause: each saw it, ran what it had
/// under way, and ran and logged what other workers had mailed it before they saw it. Returns each
/// shard's last log position, once it holds still. Bounded by `deadline`.
pub(crate) fn pause(state: &NodeState, wake: &dyn Wake, deadline: Instant) -> Result<Vec<LogSeq>, String> {
    state.hold_writes(true, wake);
    // A worker may be mid-round when the pause begins: its first round after may still run writes and
    // mail some; the second starts after that mail was sent; two more run and log the mail.
    let settle = |rounds: u64| -> Result<(), String> {
        let start = state.marks.rounds();
        loop {
            if state.marks.rounds().iter().zip(&start).all(|(now, then)| *now >= then + rounds) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("the workers did not come round in time".into());
            }
            wake.wake(0);
            std::thread::sleep(Duration::from_micros(500));
        }
    };
    settle(4)?;
    let mut last = state.marks.logged();
    for _ in 0..100 {
        settle(2)?;
        let now = state.marks.logged();
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Err("the log kept moving after writes were paused".into())
}
