//! tandemd as an operator meets it: clean exits on SIGTERM and SIGINT, and start-up errors that say
//! what is wrong.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_tests::{tandemd_path, ServerProcess};

fn exits_cleanly_on(signal: libc::c_int) {
    let mut server = ServerProcess::tandemd(&["-t", "2"]);
    let mut c = server.connect();
    assert_eq!(c.call("set k 0 0 1\r\nv\r\n"), "STORED\r\n");
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(server.child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            return;
        }
        assert!(Instant::now() < deadline, "tandemd still running 5 s after signal {signal}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    exits_cleanly_on(libc::SIGTERM);
}

#[test]
fn sigint_stops_the_server_cleanly() {
    exits_cleanly_on(libc::SIGINT);
}

fn start_error(args: &[&str]) -> String {
    let out = Command::new(tandemd_path()).args(args).stdin(Stdio::null()).output().expect("run tandemd");
    assert!(!out.status.success(), "tandemd {args:?} should refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn udp_is_refused_at_start_up() {
    let err = start_error(&["-U", "11211", "-p", "0"]);
    assert!(err.contains("-U") && err.contains("TCP only"), "{err}");
}

#[test]
fn unknown_and_bad_config_keys_are_named() {
    let dir = std::env::temp_dir().join(format!("tandem-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tandem.toml");
    std::fs::write(&path, "[server]\nmax_conections = 10\n").unwrap();
    let err = start_error(&["--config", path.to_str().unwrap(), "-p", "0"]);
    assert!(err.contains("max_conections"), "{err}");
    std::fs::write(&path, "[server]\nmemory_mb = -5\n").unwrap();
    let err = start_error(&["--config", path.to_str().unwrap(), "-p", "0"]);
    assert!(err.contains("memory_mb"), "{err}");
    let err = start_error(&["-I", "2g", "-p", "0"]);
    assert!(err.contains("max_item_size"), "{err}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let err = start_error(&["-p", &port, "-l", "127.0.0.1"]);
    assert!(err.contains("cannot listen") || err.contains("in use"), "{err}");
}

#[test]
fn a_second_tandemd_on_the_same_port_refuses_to_start() {
    let first = ServerProcess::tandemd(&["-t", "2"]);
    let err = start_error(&["-p", &first.port.to_string(), "-l", "127.0.0.1"]);
    assert!(err.contains("cannot listen"), "{err}");
    let mut c = first.connect();
    assert_eq!(c.call("version\r\n").split(' ').next(), Some("VERSION"));
}
