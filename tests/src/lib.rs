//! Helpers for Tandem's integration tests: start a real `tandemd` (or memcached) on a free loopback
//! port, talk to it over real sockets, and stop it.

pub mod bench;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The tandemd binary to test: `$TANDEM_SERVER`, else the release build, else the debug build.
pub fn tandemd_path() -> PathBuf {
    if let Ok(path) = std::env::var("TANDEM_SERVER") {
        return PathBuf::from(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo_root().join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("tandemd");
        if p.exists() {
            return p;
        }
    }
    panic!("tandemd is not built: run `cargo build --release -p dataplane` first (or set TANDEM_SERVER)");
}

/// A free loopback TCP port (bound and released; the race with other processes is accepted in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A server process killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
}

impl ServerProcess {
    /// Starts tandemd with `args` (plus `-p PORT -l 127.0.0.1`) and waits until it accepts.
    pub fn tandemd(args: &[&str]) -> ServerProcess {
        let port = free_port();
        let child = Command::new(tandemd_path())
            .args(["-p", &port.to_string(), "-l", "127.0.0.1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tandemd");
        let server = ServerProcess { child, port };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server on port {} did not start within 10 s", self.port);
    }

    /// A new client connection with timeouts set.
    pub fn connect(&self) -> Client {
        Client::connect(self.port)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw memcached client: send bytes, read exact replies.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.set_nodelay(true).unwrap();
        Client { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Reads one line including its `\r\n`.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read line");
        line
    }

    /// Reads exactly `n` bytes.
    pub fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.reader.read_exact(&mut buf).expect("read exact");
        buf
    }

    /// Sends a command and returns the first reply line.
    pub fn call(&mut self, command: &str) -> String {
        self.send(command.as_bytes());
        self.line()
    }

    /// `stats` as (name, value) pairs.
    pub fn stats(&mut self, group: &str) -> Vec<(String, String)> {
        let command = if group.is_empty() { "stats\r\n".to_string() } else { format!("stats {group}\r\n") };
        self.send(command.as_bytes());
        let mut pairs = Vec::new();
        loop {
            let line = self.line();
            if line == "END\r\n" || line.is_empty() {
                return pairs;
            }
            let mut parts = line.trim_end().splitn(3, ' ');
            parts.next();
            let name = parts.next().unwrap_or_default().to_string();
            let value = parts.next().unwrap_or_default().to_string();
            pairs.push((name, value));
        }
    }

    pub fn stat(&mut self, name: &str) -> String {
        self.stats("").into_iter().find(|(n, _)| n == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no stat {name}"))
    }
}
