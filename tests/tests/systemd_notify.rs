//! tandemd under a service manager's eyes: the sd_notify messages systemd's `Type=notify` and
//! `WatchdogSec=` rely on, read from a real datagram socket named by `$NOTIFY_SOCKET`.
//! (The appliance test in image/test checks the same against systemd itself inside a VM.)

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_tests::{free_port, tandemd_path};

/// Collects datagrams until `until` says stop or the deadline passes.
fn receive_until(
    socket: &UnixDatagram,
    deadline: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        socket
            .set_read_timeout(Some(
                end.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        let Ok(n) = socket.recv(&mut buf) else { break };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let stop = until(&message);
        got.push(message);
        if stop {
            break;
        }
    }
    got
}

/// Kills the server if the test fails half way (a stopped tandemd would otherwise outlive it).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started; SIGKILL also ends a stopped process.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

#[test]
fn ready_once_serving_watchdog_while_idle_stopping_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("tandem-sdnotify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    let port = free_port();
    let mut child = KillOnDrop(
        Command::new(tandemd_path())
            .args(["-p", &port.to_string(), "-l", "127.0.0.1", "-t", "2"])
            .env("NOTIFY_SOCKET", &path)
            // 6 s: the server looks every 1.5 s and must ping while idle (workers tick once a second).
            .env("WATCHDOG_USEC", "6000000")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn tandemd"),
    );
    let child_pid = child.0.id() as libc::pid_t;

    let first = receive_until(&socket, Duration::from_secs(10), |_| true);
    assert!(
        first
            .first()
            .is_some_and(|m| m.lines().any(|l| l == "READY=1")),
        "first message {first:?}"
    );
    assert!(
        first[0].contains("STATUS=serving memcached on 127.0.0.1:"),
        "{first:?}"
    );
    // READY=1 comes after the listeners are bound: a connection succeeds at once.
    TcpStream::connect(("127.0.0.1", port)).expect("ready means accepting");

    // Idle for 5 s: the watchdog must still be fed, well within its 6 s timeout each time.
    let pings = receive_until(&socket, Duration::from_secs(5), |_| false);
    let fed = pings
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!(
        fed >= 2,
        "only {fed} watchdog pings in 5 s of idling: {pings:?}"
    );
    assert!(
        !pings.iter().any(|m| m.contains("stalled")),
        "an idle server is not stalled: {pings:?}"
    );

    // A stopped process (every poll loop stuck) sends nothing.
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child_pid, libc::SIGSTOP) };
    let _ = receive_until(&socket, Duration::from_millis(300), |_| false);
    let silent = receive_until(&socket, Duration::from_secs(3), |_| false);
    assert!(
        silent.is_empty(),
        "a stopped tandemd still notified: {silent:?}"
    );
    // SAFETY: as above.
    unsafe {
        libc::kill(child_pid, libc::SIGCONT);
        libc::kill(child_pid, libc::SIGTERM);
    }
    let last = receive_until(&socket, Duration::from_secs(10), |m| {
        m.contains("STOPPING=1")
    });
    assert!(
        last.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{last:?}"
    );
    assert!(child.0.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn silent_without_a_service_manager() {
    // No NOTIFY_SOCKET: tandemd starts and serves as before (the other integration tests rely on it).
    let port = free_port();
    let _child = KillOnDrop(
        Command::new(tandemd_path())
            .args(["-p", &port.to_string(), "-l", "127.0.0.1", "-t", "1"])
            .env_remove("NOTIFY_SOCKET")
            .env("WATCHDOG_USEC", "100000")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn tandemd"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tandemd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}
