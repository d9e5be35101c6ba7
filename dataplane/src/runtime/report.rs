//! `stats` answers, assembled from every shard's and worker's counters, with memcached's names.
//!
//! Counters are single-writer atomics owned by their shard or worker (see [`crate::stats`]); reading
//! them here needs no message and no lock. Groups: general, `settings`, `items`, `slabs`, `sizes`,
//! `conns`. Tandem has no slab classes: `items` and `slabs` report one class per shard (class id =
//! shard + 1), whose pages are the shard's segments.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use super::Shared;
use crate::shard::Shard;
use crate::stats::ConnCounters;

type Pairs = Vec<(Cow<'static, str>, String)>;

fn push(pairs: &mut Pairs, name: impl Into<Cow<'static, str>>, value: impl ToString) {
    pairs.push((name.into(), value.to_string()));
}

/// The pairs of a stats group, or None for a group memcached does not know either.
pub fn stats(shared: &Shared, group: Option<&str>) -> Option<Pairs> {
    match group {
        None | Some("") => Some(general(shared)),
        Some("settings") => Some(settings(shared)),
        Some("items") => Some(items(shared)),
        Some("slabs") => Some(slabs(shared)),
        Some("sizes") => Some(vec![("sizes_status".into(), "disabled".into())]),
        Some("conns") => Some(conns(shared)),
        Some("net") => Some(net(shared)),
        Some("replication") => Some(replication(shared)),
        _ => None,
    }
}

/// `stats replication`: this node's role and, per standby (on an active) or for the link to the active
/// (on a standby), the state, positions and lag.
fn replication(shared: &Shared) -> Pairs {
    use crate::replication::Report;
    let mut p = Pairs::new();
    let list = |values: &[u64]| values.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let settings = shared.settings.replication.as_ref();
    let Some(node) = shared.replication.as_ref() else {
        push(&mut p, "role", "none".to_string());
        return p;
    };
    let changes = node.changes();
    match &node.report() {
        Report::Active { history, epoch, report } => {
            let r = report.lock().unwrap();
            let config = settings.expect("a replicating node has replication settings");
            push(&mut p, "role", "active".to_string());
            push(&mut p, "replication_id", history.to_string());
            push(&mut p, "epoch", epoch.0.to_string());
            push(&mut p, "mode", format!("{:?}", config.mode).to_lowercase());
            push(&mut p, "ack", format!("{:?}", config.ack).to_lowercase());
            push(&mut p, "transport", config.transport.name().to_string());
            push(&mut p, "listen", r.listen.clone());
            push(&mut p, "newest", list(&r.newest));
            push(&mut p, "standbys", r.peers.len().to_string());
            push(&mut p, "full_syncs", r.full_syncs.to_string());
            push(&mut p, "partial_syncs", r.partial_syncs.to_string());
            push(&mut p, "refused", r.refused.to_string());
            push(&mut p, "sync_degraded", r.sync_degraded.to_string());
            push(&mut p, "bytes_shipped", r.bytes_shipped.to_string());
            push(&mut p, "shipments", r.shipments.to_string());
            push(&mut p, "snapshot_bytes", r.snapshot_bytes.to_string());
            push(&mut p, "backlog_bytes", r.backlog_bytes.to_string());
            push(&mut p, "ring_full_events", r.ring_full_events.to_string());
            push(&mut p, "ring_records_lost", r.ring_records_lost.to_string());
            push(&mut p, "ring_resyncs", r.ring_resyncs.to_string());
            push(&mut p, "link_failures", r.link_failures.to_string());
            push(&mut p, "last_link_error", if r.last_link_error.is_empty() { "none".to_string() } else { r.last_link_error.replace(' ', "_") });
            // Records each worker has logged (and answered) by now: a standby's report may be up to
            // 50 ms old, so what it acked is older still and the difference can only overstate.
            let logged = node.marks.logged();
            let unacked = |acked: &[u64]| -> u64 { logged.iter().zip(acked).map(|(logged, acked)| logged.0.saturating_sub(*acked)).sum() };
            // The async loss window: at most this many answered writes are lost if this node dies now,
            // whichever standby takes over (per standby: standby_N_unacked_records).
            if let Some(window) = r.peers.iter().map(|peer| unacked(&peer.acked)).max() {
                push(&mut p, "loss_window_records", window.to_string());
            }
            for (i, peer) in r.peers.iter().enumerate() {
                let name = |field: &str| format!("standby_{i}_{field}");
                push(&mut p, name("addr"), peer.addr.clone());
                push(&mut p, name("state"), peer.state.to_string());
                push(&mut p, name("acked"), list(&peer.acked));
                push(&mut p, name("unacked_records"), unacked(&peer.acked).to_string());
                push(&mut p, name("lag_records"), peer.lag_records.to_string());
                push(&mut p, name("lag_bytes"), peer.lag_bytes.to_string());
                push(&mut p, name("lag_ms"), peer.lag_millis.to_string());
                push(&mut p, name("transport"), peer.transport.to_string());
                if peer.transport == "rdma" {
                    let link = &peer.link;
                    push(&mut p, name("rdma_writes_posted"), link.writes_posted.to_string());
                    push(&mut p, name("rdma_completions"), link.completions.to_string());
                    push(&mut p, name("rdma_errors"), link.errors.to_string());
                    push(&mut p, name("rdma_credit_stalls"), link.credit_stalls.to_string());
                }
            }
        }
        Report::Standby { report } => {
            let r = report.lock().unwrap();
            push(&mut p, "role", "standby".to_string());
            push(&mut p, "state", r.state.to_string());
            push(&mut p, "active", r.active.clone());
            push(&mut p, "replication_id", r.history.map_or_else(|| "none".to_string(), |h| h.to_string()));
            push(&mut p, "epoch", r.epoch.0.to_string());
            push(&mut p, "transport", r.transport.to_string());
            push(&mut p, "applied", list(&r.applied));
            push(&mut p, "connects", r.connects.to_string());
            push(&mut p, "full_syncs", r.full_syncs.to_string());
            push(&mut p, "partial_syncs", r.partial_syncs.to_string());
            push(&mut p, "refused", r.refused.to_string());
            push(&mut p, "bytes_received", r.bytes_received.to_string());
            push(&mut p, "last_heard_ms", r.last_heard_millis.to_string());
            push(&mut p, "stalls_forgiven", r.stalls_forgiven.to_string());
            if r.transport == "rdma" {
                let link = &r.link;
                push(&mut p, "rdma_slots", link.slots.to_string());
                push(&mut p, "rdma_doorbells", link.doorbells.to_string());
                push(&mut p, "rdma_credit_writes", link.writes_posted.to_string());
                push(&mut p, "rdma_completions", link.completions.to_string());
                push(&mut p, "rdma_errors", link.errors.to_string());
                push(&mut p, "rdma_incomplete_polls", link.incomplete_polls.to_string());
            }
            push(&mut p, "link_failures", r.link_failures.to_string());
            push(&mut p, "last_error", if r.last_error.is_empty() { "none".to_string() } else { r.last_error.replace(' ', "_") });
        }
    }
    push(&mut p, "role_changes", changes.len().to_string());
    let counts = &node.counts;
    push(&mut p, "promotions", counts.promotions.load(std::sync::atomic::Ordering::Relaxed).to_string());
    push(&mut p, "step_downs", counts.step_downs.load(std::sync::atomic::Ordering::Relaxed).to_string());
    push(&mut p, "switchovers", counts.switchovers.load(std::sync::atomic::Ordering::Relaxed).to_string());
    push(&mut p, "switchovers_aborted", counts.switchovers_aborted.load(std::sync::atomic::Ordering::Relaxed).to_string());
    push(&mut p, "writes_paused", u8::from(node.writes_held()).to_string());
    if let Some(last) = changes.last() {
        push(&mut p, "last_role_change", last.replace(' ', "_"));
    }
    push(&mut p, "promotions_declined", counts.promotions_declined.load(std::sync::atomic::Ordering::Relaxed).to_string());
    if let Some(last) = node.last_declined() {
        push(&mut p, "last_promotion_declined", last.replace(' ', "_"));
    }
    p
}

fn rusage() -> (String, String) {
    // SAFETY: getrusage fills a plain struct for this process.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let fmt = |tv: libc::timeval| format!("{}.{:06}", tv.tv_sec, tv.tv_usec);
    (fmt(usage.ru_utime), fmt(usage.ru_stime))
}

fn general(shared: &Shared) -> Pairs {
    let settings = &shared.settings;
    let clock = crate::clock::Clock::global();
    let now = clock.now();
    let mut sum_cmd = std::collections::BTreeMap::<&'static str, u64>::new();
    let mut sum_conn = std::collections::BTreeMap::<&'static str, u64>::new();
    let (mut curr_items, mut total_items, mut bytes, mut evictions, mut reclaimed) = (0, 0, 0, 0, 0);
    let (mut expired_unfetched, mut evicted_unfetched, mut get_expired, mut reinserted, mut oom) = (0, 0, 0, 0, 0);
    let mut get_flushed = 0;
    let (mut segments_used, mut segments_total, mut index_bytes) = (0, 0, 0);
    let mut backing = "none";
    for info in shared.worker_infos() {
        info.commands.for_each(|name, v| *sum_cmd.entry(name).or_default() += v);
        info.conns.for_each(|name, v| *sum_conn.entry(name).or_default() += v);
        let s = &info.store;
        curr_items += s.curr_items.get();
        total_items += s.total_items.get();
        bytes += s.bytes.get();
        evictions += s.evictions.get();
        reclaimed += s.reclaimed.get();
        expired_unfetched += s.expired_unfetched.get();
        evicted_unfetched += s.evicted_unfetched.get();
        get_expired += s.get_expired.get();
        get_flushed += s.get_flushed.get();
        reinserted += s.reinserted.get();
        oom += s.outofmemory.get();
        segments_used += s.segments_used.get();
        segments_total += s.segments_total.get();
        index_bytes += s.index_bytes.get();
        backing = info.backing.name();
    }
    let cmd = |name: &str| sum_cmd.get(name).copied().unwrap_or(0);
    let conn = |name: &str| sum_conn.get(name).copied().unwrap_or(0);
    let (user, system) = rusage();
    let mut p = Pairs::new();
    push(&mut p, "pid", std::process::id());
    push(&mut p, "uptime", shared.started.elapsed().as_secs());
    push(&mut p, "time", clock.to_unix(now));
    push(&mut p, "version", crate::VERSION);
    push(&mut p, "libevent", "none");
    push(&mut p, "pointer_size", usize::BITS);
    push(&mut p, "rusage_user", user);
    push(&mut p, "rusage_system", system);
    push(&mut p, "max_connections", settings.max_connections);
    push(&mut p, "curr_connections", conn("curr_connections"));
    push(&mut p, "total_connections", conn("total_connections"));
    push(&mut p, "rejected_connections", conn("rejected_connections"));
    push(&mut p, "connection_structures", conn("curr_connections"));
    for name in ["cmd_get", "cmd_set", "cmd_flush", "cmd_touch"] {
        push(&mut p, name, cmd(name));
    }
    push(&mut p, "cmd_meta", 0);
    push(&mut p, "get_hits", cmd("get_hits"));
    push(&mut p, "get_misses", cmd("get_misses"));
    push(&mut p, "get_expired", cmd("get_expired") + get_expired);
    push(&mut p, "get_flushed", cmd("get_flushed") + get_flushed);
    for name in [
        "delete_misses", "delete_hits", "incr_misses", "incr_hits", "decr_misses", "decr_hits",
        "cas_misses", "cas_hits", "cas_badval", "touch_hits", "touch_misses",
    ] {
        push(&mut p, name, cmd(name));
    }
    push(&mut p, "auth_cmds", 0);
    push(&mut p, "auth_errors", 0);
    push(&mut p, "bytes_read", conn("bytes_read"));
    push(&mut p, "bytes_written", conn("bytes_written"));
    push(&mut p, "limit_maxbytes", shared.memory_limit.load(Ordering::Relaxed));
    push(&mut p, "accepting_conns", 1);
    push(&mut p, "threads", settings.threads);
    push(&mut p, "conn_yields", conn("conn_yields"));
    push(&mut p, "hash_bytes", index_bytes);
    push(&mut p, "curr_items", curr_items);
    push(&mut p, "total_items", total_items);
    push(&mut p, "expired_unfetched", expired_unfetched);
    push(&mut p, "evicted_unfetched", evicted_unfetched);
    push(&mut p, "evictions", evictions);
    push(&mut p, "reclaimed", reclaimed);
    push(&mut p, "bytes", bytes);
    // Tandem's own.
    push(&mut p, "shards", settings.threads);
    push(&mut p, "memory_backing", backing);
    push(&mut p, "cross_shard_requests", conn("cross_shard_requests"));
    push(&mut p, "read_only_refusals", conn("read_only_refusals"));
    push(&mut p, "reinserted", reinserted);
    push(&mut p, "outofmemory", oom);
    push(&mut p, "segments_used", segments_used);
    push(&mut p, "segments_total", segments_total);
    p
}

fn settings(shared: &Shared) -> Pairs {
    let s = &shared.settings;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut p = Pairs::new();
    push(&mut p, "maxbytes", shared.memory_limit.load(Ordering::Relaxed));
    push(&mut p, "maxconns", s.max_connections);
    push(&mut p, "tcpport", s.port);
    push(&mut p, "udpport", 0);
    push(&mut p, "inter", &s.listen);
    push(&mut p, "verbosity", s.verbosity.load(Ordering::Relaxed));
    push(&mut p, "oldest", 0);
    push(&mut p, "evictions", if s.evictions { "on" } else { "off" });
    push(&mut p, "domain_socket", "NULL");
    push(&mut p, "num_threads", s.threads);
    push(&mut p, "stat_key_prefix", ":");
    push(&mut p, "detail_enabled", "no");
    push(&mut p, "reqs_per_event", s.reqs_per_event);
    push(&mut p, "cas_enabled", yes_no(s.cas_enabled));
    push(&mut p, "tcp_backlog", crate::net::kernel::LISTEN_BACKLOG);
    push(&mut p, "binding_protocol", "auto-negotiate");
    push(&mut p, "auth_enabled_sasl", "no");
    push(&mut p, "item_size_max", s.item_size_max);
    push(&mut p, "maxconns_fast", "yes");
    push(&mut p, "flush_enabled", yes_no(s.flush_enabled));
    push(&mut p, "shutdown_command", yes_no(s.shutdown_enabled));
    push(&mut p, "memory_backing", shared.worker_infos().next().map(|w| w.backing.name()).unwrap_or("none"));
    push(&mut p, "shards", s.threads);
    p
}

fn items(shared: &Shared) -> Pairs {
    let mut p = Pairs::new();
    for (shard, info) in shared.worker_infos().enumerate() {
        let s = &info.store;
        if s.curr_items.get() == 0 && s.evictions.get() == 0 {
            continue;
        }
        let class = shard + 1;
        push(&mut p, format!("items:{class}:number"), s.curr_items.get());
        push(&mut p, format!("items:{class}:evicted"), s.evictions.get());
        push(&mut p, format!("items:{class}:evicted_unfetched"), s.evicted_unfetched.get());
        push(&mut p, format!("items:{class}:outofmemory"), s.outofmemory.get());
        push(&mut p, format!("items:{class}:reclaimed"), s.reclaimed.get());
        push(&mut p, format!("items:{class}:expired_unfetched"), s.expired_unfetched.get());
        push(&mut p, format!("items:{class}:mem_requested"), s.bytes.get());
    }
    p
}

fn slabs(shared: &Shared) -> Pairs {
    let mut p = Pairs::new();
    let mut total = 0u64;
    let mut active = 0;
    for (shard, info) in shared.worker_infos().enumerate() {
        let s = &info.store;
        let class = shard + 1;
        let segment = crate::store::SEGMENT_SIZE as u64;
        total += s.segments_total.get() * segment;
        if s.segments_used.get() == 0 {
            continue;
        }
        active += 1;
        push(&mut p, format!("{class}:chunk_size"), segment);
        push(&mut p, format!("{class}:chunks_per_page"), 1);
        push(&mut p, format!("{class}:total_pages"), s.segments_used.get());
        push(&mut p, format!("{class}:total_chunks"), s.segments_used.get());
        push(&mut p, format!("{class}:used_chunks"), s.segments_used.get());
        push(&mut p, format!("{class}:free_chunks"), s.segments_total.get() - s.segments_used.get().min(s.segments_total.get()));
        push(&mut p, format!("{class}:mem_requested"), s.bytes.get());
    }
    push(&mut p, "active_slabs", active);
    push(&mut p, "total_malloced", total);
    p
}

/// `stats net`: the network backend (updated by each worker once a second), summed over workers.
fn net(shared: &Shared) -> Pairs {
    let mut p = Pairs::new();
    let backend = match shared.settings.net {
        crate::config::NetBackend::Kernel => "kernel",
        crate::config::NetBackend::Dpdk(_) => "dpdk",
        crate::config::NetBackend::Tap(_) => "tap",
    };
    push(&mut p, "backend", backend);
    if shared.settings.net == crate::config::NetBackend::Kernel {
        push(&mut p, "kernel_io", shared.settings.kernel_io.name());
    }
    let mut sums: Vec<(&'static str, u64)> = Vec::new();
    for info in shared.worker_infos() {
        for &(name, value) in info.net.lock().unwrap().iter() {
            match sums.iter_mut().find(|(n, _)| *n == name) {
                Some((_, sum)) => *sum += value,
                None => sums.push((name, value)),
            }
        }
    }
    for (name, value) in sums {
        push(&mut p, name, value);
    }
    // How connections spread over the workers (each on its own queue).
    for (worker, info) in shared.worker_infos().enumerate() {
        if let Some(&(_, accepted)) = info.net.lock().unwrap().iter().find(|(n, _)| *n == "tcp_accepted") {
            push(&mut p, format!("worker_{worker}_tcp_accepted"), accepted);
        }
    }
    p
}

fn conns(shared: &Shared) -> Pairs {
    let mut p = Pairs::new();
    for info in shared.worker_infos() {
        for (fd, addr) in &info.listeners {
            push(&mut p, format!("{fd}:addr"), format!("tcp:{addr}"));
            push(&mut p, format!("{fd}:state"), "conn_listening");
        }
        for (fd, peer) in info.conn_list.lock().unwrap().iter() {
            let addr = peer.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
            push(&mut p, format!("{fd}:addr"), format!("tcp:{addr}"));
            push(&mut p, format!("{fd}:state"), "conn_parse_cmd");
        }
    }
    p
}

/// `stats reset` on this worker: its own counters only (each thread resets what it owns).
pub fn reset_local(shard: &mut Shard, conns: &ConnCounters) {
    shard.counters.for_each_mut(|c| c.set(0));
    for c in [&conns.total_connections, &conns.rejected_connections, &conns.bytes_read, &conns.bytes_written, &conns.conn_yields, &conns.cross_shard_requests, &conns.read_only_refusals] {
        c.set(0);
    }
    let s = shard.store.stats();
    for c in [&s.total_items, &s.evictions, &s.reclaimed, &s.expired_unfetched, &s.evicted_unfetched, &s.reinserted, &s.outofmemory, &s.get_expired, &s.get_flushed] {
        c.set(0);
    }
}

/// Asks the process to shut down (the `shutdown` command): main waits for this signal.
pub fn request_shutdown() {
    // SAFETY: sending a signal to our own process.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
}
