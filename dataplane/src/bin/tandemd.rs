//! tandemd: the Tandem cache server. Flags follow memcached's; see `tandemd --help`.
//!
//! Under systemd (`Type=notify`) it reports readiness once it serves, a one-line status, and feeds
//! the watchdog only while every worker's poll loop makes progress (see `dataplane::notify`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use dataplane::config::{Flags, Settings};
use dataplane::notify::{Notifier, Verdict, Watchdog};
use dataplane::runtime::Server;

fn main() {
    if let Err(e) = run() {
        eprintln!("tandemd: {e:#}");
        // `systemctl status` shows this as the service's one-line status.
        Notifier::from_env().send(&format!("STATUS=cannot start: {}", one_line(&format!("{e:#}"))));
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let settings = Settings::from_flags(&flags)?;
    if flags.release_service_address {
        println!("tandemd: {}", dataplane::failover::release_after_stop(&settings)?);
        return Ok(());
    }
    let level = match settings.verbosity.load(Ordering::Relaxed) {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    // Kernel sockets take a file descriptor per connection; the userspace stack's connections take none.
    if settings.net == dataplane::config::NetBackend::Kernel {
        raise_fd_limit(settings.max_connections)?;
    }
    // Workers inherit this mask, so SIGTERM and SIGINT reach only the wait below.
    let signals = block_signals(&[libc::SIGTERM, libc::SIGINT]);
    let notifier = Notifier::from_env();
    let server = Server::start(settings).context("cannot start")?;
    tracing::info!(addrs = ?server.addrs, threads = server.shared.settings.threads, "tandemd serving");
    let serving = format!("serving memcached on {}, {} shards", list_addrs(&server.addrs), server.shared.settings.threads);
    // Every listener is bound and every worker polls: systemd may now call the service started.
    notifier.send(&format!("READY=1\nSTATUS={serving}"));
    let signal = supervise(&server, &signals, &notifier, &serving);
    tracing::info!(signal, "shutting down");
    notifier.send("STOPPING=1\nSTATUS=shutting down");
    server.stop();
    server.join();
    Ok(())
}

/// Waits for SIGTERM or SIGINT. Meanwhile, under a systemd watchdog, pings it while every worker's poll
/// loop makes rounds, and stops pinging (saying which worker is stuck) when one does not.
fn supervise(server: &Server, signals: &libc::sigset_t, notifier: &Notifier, serving: &str) -> libc::c_int {
    let mut watchdog = if notifier.active() { Watchdog::from_env() } else { None };
    let interval = watchdog.as_ref().map_or(Duration::from_secs(3600), Watchdog::check_interval);
    let mut stuck_before = None;
    loop {
        if let Some(signal) = wait_for(signals, interval) {
            return signal;
        }
        let Some(dog) = watchdog.as_mut() else { continue };
        let rounds: Vec<u64> = server.shared.worker_infos().map(|w| w.rounds.load(Ordering::Relaxed)).collect();
        match dog.check(&rounds, Instant::now()) {
            Verdict::Ping => {
                let status = if stuck_before.take().is_some() { format!("\nSTATUS={serving}") } else { String::new() };
                notifier.send(&format!("WATCHDOG=1{status}"));
            }
            Verdict::Stalled(worker) if stuck_before != Some(worker) => {
                stuck_before = Some(worker);
                tracing::warn!(worker, "worker poll loop made no progress; not feeding the watchdog");
                notifier.send(&format!("STATUS=worker {worker} poll loop stalled; watchdog not fed"));
            }
            Verdict::Stalled(_) | Verdict::Wait => {}
        }
    }
}

/// A multi-line error (TOML's quote the offending line) as one line: its first line and its last.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match lines.as_slice() {
        [] => String::new(),
        [only] => only.to_string(),
        [first, .., last] => format!("{first}: {last}"),
    }
}

fn list_addrs(addrs: &[std::net::SocketAddr]) -> String {
    addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// File descriptors needed beyond client connections: listeners, pollers, wakers, logs.
const SPARE_FDS: u64 = 64;

/// Raises RLIMIT_NOFILE so `-c` connections can be open at once (as memcached does at start-up).
fn raise_fd_limit(max_connections: usize) -> anyhow::Result<()> {
    let needed = max_connections as u64 + SPARE_FDS;
    // SAFETY: getrlimit/setrlimit read and write a plain struct for this process.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Ok(());
        }
        if limit.rlim_cur >= needed {
            return Ok(());
        }
        let wanted = libc::rlimit { rlim_cur: needed, rlim_max: limit.rlim_max.max(needed) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return Ok(());
        }
        if limit.rlim_max >= needed {
            let soft = libc::rlimit { rlim_cur: needed, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
                return Ok(());
            }
        }
        anyhow::bail!(
            "-c {max_connections} needs {needed} open files but the limit is {} (hard {}): start as root or ask for fewer connections",
            limit.rlim_cur,
            limit.rlim_max
        )
    }
}

fn block_signals(list: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in list {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for one of the blocked signals in `set`; None when the time ran out.
fn wait_for(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let spec = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: the set was initialised by block_signals; a null siginfo pointer is allowed.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &spec) };
    (signal > 0).then_some(signal)
}
