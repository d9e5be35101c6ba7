//! Operator settings: memcached's flags, a TOML file, and the [`Settings`] every shard reads.
//!
//! (Flag and file parsing land with the runtime; [`Settings`] is the shape every module reads.)

use std::sync::atomic::AtomicU32;

/// Settings fixed at start-up, shared read-only by every thread (verbosity can change at run time).
#[derive(Debug)]
pub struct Settings {
    /// `-p`
    pub port: u16,
    /// `-l`
    pub listen: String,
    /// `-m`, in bytes.
    pub memory_limit: usize,
    /// `-t`
    pub threads: usize,
    /// `-c`
    pub max_connections: usize,
    /// `-I`, in bytes.
    pub item_size_max: usize,
    /// `-C` turns CAS off (responses carry 0).
    pub cas_enabled: bool,
    /// `-F` turns flush_all off.
    pub flush_enabled: bool,
    /// `-A` turns `shutdown` on.
    pub shutdown_enabled: bool,
    /// `-M` turns eviction off.
    pub evictions: bool,
    /// `-R`: requests handled per connection per event before yielding to others.
    pub reqs_per_event: usize,
    /// `-v` count; `verbosity N` changes it.
    pub verbosity: AtomicU32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            port: 11211,
            listen: "127.0.0.1".into(),
            memory_limit: 64 << 20,
            threads: 4,
            max_connections: 1024,
            item_size_max: 1 << 20,
            cas_enabled: true,
            flush_enabled: true,
            shutdown_enabled: false,
            evictions: true,
            reqs_per_event: 20,
            verbosity: AtomicU32::new(0),
        }
    }
}
