//! tandemd: the Tandem cache server. Flags follow memcached's; see `tandemd --help`.

use std::sync::atomic::Ordering;

use anyhow::Context;
use clap::Parser;
use dataplane::config::{Flags, Settings};
use dataplane::runtime::Server;

fn main() {
    if let Err(e) = run() {
        eprintln!("tandemd: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let settings = Settings::from_flags(&flags)?;
    let level = match settings.verbosity.load(Ordering::Relaxed) {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    raise_fd_limit(settings.max_connections)?;
    // Workers inherit this mask, so SIGTERM and SIGINT reach only the sigwait below.
    let signals = block_signals(&[libc::SIGTERM, libc::SIGINT]);
    let server = Server::start(settings).context("cannot start")?;
    tracing::info!(addrs = ?server.addrs, threads = server.shared.settings.threads, "tandemd serving");
    let signal = wait_for(&signals);
    tracing::info!(signal, "shutting down");
    server.stop();
    server.join();
    Ok(())
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

fn wait_for(set: &libc::sigset_t) -> libc::c_int {
    let mut signal: libc::c_int = 0;
    // SAFETY: the set was initialised by block_signals; sigwait writes the signal number.
    unsafe {
        libc::sigwait(set, &mut signal);
    }
    signal
}
