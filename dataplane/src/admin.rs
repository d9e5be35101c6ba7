//! The admin endpoint: a Unix socket on which `tandemctl` asks for a node's status and role changes.
//!
//! Why a Unix socket: cache clients reach a node only over TCP, so they cannot reach this; who may
//! use it is decided by file permissions (the socket is made 0600: the user tandemd runs as, and
//! root), with no secret to manage; and it works the same in every network namespace on the machine.
//! The path is `[admin] socket`, by default `<failover.state_dir>/admin.sock`.
//!
//! The protocol is one request line, then reply lines, then the connection closes:
//!
//! ```text
//! status                     ->  key value      (one line per field)  then  OK
//! promote [force]            ->  OK <message>   or  ERR <why not>
//! demote                     ->  OK <message>   or  ERR <why not>
//! switchover [timeout_ms]    ->  OK <message>   or  ERR <why not>     (run on the active)
//! ```
//!
//! The last line always starts with `OK ` or `ERR `; values and messages are single lines. What each
//! request does is [`crate::roles`]'. Each connection is served on a thread of its own (at most
//! [`MAX_CONNECTIONS`] at once), so `status` answers while a switchover runs; requests wait at most
//! [`REQUEST_TIMEOUT`] for their line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::replication::NodeState;
use crate::roles;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request line.
const MAX_LINE: u64 = 256;
/// A switchover's timeout when the request names none.
pub const DEFAULT_SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A running admin endpoint; stopped and its socket removed by [`AdminServer::stop`].
pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Listens on `path` for `state`'s node. A socket file left by a dead tandemd is replaced; one that
    /// a live process answers on is an error.
    pub fn start(path: &Path, state: Arc<NodeState>) -> anyhow::Result<AdminServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                bail!("{}: another process already serves the admin endpoint there", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("cannot remove the stale admin socket {}", path.display()))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let listener = UnixListener::bind(path).with_context(|| format!("cannot listen for tandemctl on {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name("tandem-admin".into()).spawn(move || serve(listener, state, &stopping))?;
        tracing::info!(path = %path.display(), "admin endpoint (tandemctl) listening");
        Ok(AdminServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// Stops accepting, waits for the accept loop, and removes the socket file.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The accept loop: polls the non-blocking listener every 50 ms so that a stop is seen.
fn serve(listener: UnixListener, state: Arc<NodeState>, stop: &AtomicBool) {
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = reply_to(stream, &["ERR busy: too many admin connections".to_string()]);
            continue;
        }
        let (state, open) = (state.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("tandem-admin-conn".into()).spawn(move || {
            if let Err(e) = handle(stream, &state) {
                tracing::debug!(error = %e, "admin connection");
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot serve an admin connection");
        }
    }
}

fn reply_to(mut stream: UnixStream, lines: &[String]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut text = lines.join("\n");
    text.push('\n');
    stream.write_all(text.as_bytes())
}

fn handle(stream: UnixStream, state: &Arc<NodeState>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut line)?;
    let lines = answer(line.trim(), state);
    reply_to(stream, &lines)
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Status,
    Promote { force: bool },
    Demote,
    Switchover { timeout: Duration },
}

/// Parses a request line.
pub fn parse(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["status"] => Ok(Request::Status),
        ["promote"] => Ok(Request::Promote { force: false }),
        ["promote", "force"] => Ok(Request::Promote { force: true }),
        ["demote"] => Ok(Request::Demote),
        ["switchover"] => Ok(Request::Switchover { timeout: DEFAULT_SWITCHOVER_TIMEOUT }),
        ["switchover", millis] => match millis.parse::<u64>() {
            Ok(ms) if ms > 0 && Duration::from_millis(ms) <= roles::SWITCHOVER_TIMEOUT_MAX => {
                Ok(Request::Switchover { timeout: Duration::from_millis(ms) })
            }
            _ => Err(format!("switchover timeout {millis:?}: milliseconds, 1 to {}", roles::SWITCHOVER_TIMEOUT_MAX.as_millis())),
        },
        [] => Err("empty request".into()),
        _ => Err(format!("unknown request {line:?}: status | promote [force] | demote | switchover [timeout_ms]")),
    }
}

/// The reply lines to one request line.
fn answer(line: &str, state: &Arc<NodeState>) -> Vec<String> {
    let one_line = |text: String| text.replace(['\n', '\r'], " ");
    let outcome = match parse(line) {
        Err(e) => Err(e),
        Ok(Request::Status) => {
            let mut lines: Vec<String> = roles::status(state).into_iter().map(|(k, v)| format!("{k} {}", one_line(v))).collect();
            lines.push("OK".into());
            return lines;
        }
        Ok(Request::Promote { force }) => roles::promote(state, force),
        Ok(Request::Demote) => roles::demote(state),
        Ok(Request::Switchover { timeout }) => roles::switchover(state, timeout),
    };
    match outcome {
        Ok(message) => vec![format!("OK {}", one_line(message))],
        Err(message) => {
            tracing::warn!(request = line, %message, "tandemctl request refused");
            vec![format!("ERR {}", one_line(message))]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!(parse("status"), Ok(Request::Status));
        assert_eq!(parse("  promote   force "), Ok(Request::Promote { force: true }));
        assert_eq!(parse("demote"), Ok(Request::Demote));
        assert_eq!(parse("switchover"), Ok(Request::Switchover { timeout: DEFAULT_SWITCHOVER_TIMEOUT }));
        assert_eq!(parse("switchover 250"), Ok(Request::Switchover { timeout: Duration::from_millis(250) }));
        assert!(parse("switchover 0").unwrap_err().contains("milliseconds"));
        assert!(parse("switchover 9999999").is_err());
        assert!(parse("promote now").unwrap_err().contains("status | promote [force]"));
        assert!(parse("").is_err());
    }
}
