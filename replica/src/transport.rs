//! The narrow interface between the replication logic and the wire that carries the data stream, its
//! TCP implementation, and an in-memory link for tests.
//!
//! A replication connection has two parts:
//! - the **control connection**: the authenticated TCP socket. The [`crate::handshake`], acks,
//!   heartbeats, the handover and its answer, and the RDMA setup travel on it, always;
//! - the **data stream**: the wire messages the active sends to feed the standby's shards (`Batch`,
//!   `SnapshotBegin`, `SnapshotItems`, `SnapshotEnd`; see [`crate::wire`]), in order. It goes through
//!   a [`StreamSink`] on the active and comes out of a [`StreamSource`] on the standby, whose bytes the
//!   receiver reassembles and checks with the same [`MessageReader`] whatever carried them.
//!
//! Two small traits, one per end, both non-blocking (the caller's poll loop drives them; nothing here
//! spawns threads or blocks):
//! - [`StreamSink`]: the active appends whole messages to [`StreamSink::queue`] while
//!   [`StreamSink::room`] says there is room, and [`StreamSink::pump`] moves them on.
//! - [`StreamSource`]: [`StreamSource::receive`] moves what arrived into a [`MessageReader`].
//!
//! Implementations:
//! - [`TcpLink`]: the control socket itself; with the TCP transport the data stream rides it,
//!   interleaved with the control messages in one byte stream.
//! - [`crate::ring_link`]: the data stream in the slots of a receive ring written one-sided (the RDMA
//!   transport over verbs, and a memory-backed double for tests).
//! - [`memory::pair`]: in-process queues with knobs to deliver the stream in small pieces and to
//!   corrupt a byte of it, so the reader's reassembly and checks are exercised without a network.

use std::io::{self, Write};

use thiserror::Error;

use crate::ring::RingError;
use crate::wire::MessageReader;

/// What carries the data stream (`[replication] transport`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    #[default]
    Tcp,
    /// One-sided RDMA WRITEs into the standby's ring (feature `rdma`).
    Rdma(RdmaSettings),
}

/// Where the RDMA transport runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RdmaSettings {
    /// The device (default: the first with an active port).
    pub device: Option<String>,
    /// The local GID index (default: the RoCE v2 entry with an IPv4 address).
    pub gid_index: Option<u8>,
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Rdma(_) => "rdma",
        }
    }
}

/// Whether this build has the RDMA transport (cargo feature `rdma`).
pub const RDMA_BUILT: bool = cfg!(feature = "rdma");

/// The error a build without the feature gives for `transport = "rdma"`.
pub fn rdma_unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "transport = \"rdma\" needs a tandemd built with RDMA support (cargo feature `rdma`, libibverbs); this one was built without it",
    )
}

/// The RDMA device a node's links are made on (feature `rdma`): opened once, shared by every connection.
#[cfg(feature = "rdma")]
pub type Device = std::sync::Arc<crate::rdma::link::Device>;
/// Without the feature there is no RDMA device: [`open_device`] refuses `transport = "rdma"`.
#[cfg(not(feature = "rdma"))]
#[derive(Clone, Debug)]
pub enum Device {}

/// Opens what `transport` needs, for the shipper and the receiver alike: nothing for TCP; for RDMA the
/// device and port its settings name (an error saying why it cannot be opened), or, in a build
/// without the feature, [`rdma_unsupported`].
pub fn open_device(transport: &Transport) -> io::Result<Option<Device>> {
    match transport {
        Transport::Tcp => Ok(None),
        #[cfg(feature = "rdma")]
        Transport::Rdma(settings) => crate::rdma::link::Device::open(settings.device.as_deref(), settings.gid_index)
            .map(Some)
            .map_err(|e| io::Error::other(format!("the RDMA transport cannot open its device: {e}"))),
        #[cfg(not(feature = "rdma"))]
        Transport::Rdma(_) => Err(rdma_unsupported()),
    }
}

/// Why a link failed. Every error ends the connection; the standby reconnects and resyncs from what
/// its shards applied, so nothing after the failure is applied.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("closed by the peer")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// The RDMA transport's verbs (a failed completion, a refused post), said as libibverbs says it.
    #[error("rdma: {0}")]
    Rdma(String),
}

/// What a transport counts, for `stats replication` (zeros where a transport has nothing to count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// One-sided writes posted (slots, credits).
    pub writes_posted: u64,
    /// Completions polled (signaled writes, received doorbells).
    pub completions: u64,
    /// Failed completions and refused posts.
    pub errors: u64,
    /// Times the active ran out of credits (each stall counts once).
    pub credit_stalls: u64,
    /// Doorbells (WRITE_WITH_IMM) received.
    pub doorbells: u64,
    /// Ring slots consumed.
    pub slots: u64,
    /// Polls that found the next slot half-written.
    pub incomplete_polls: u64,
}

/// The active's end of the data stream to one standby.
pub trait StreamSink {
    /// Bytes of messages that may be queued now; at 0 the stream is backed up (socket buffer, credits).
    fn room(&self) -> usize;
    /// Where whole wire messages are appended, in stream order; [`StreamSink::pump`] sends them.
    fn queue(&mut self) -> &mut Vec<u8>;
    /// Moves queued messages on (socket writes; ring slots, their WRITEs, completions and credits).
    /// Returns whether anything moved.
    fn pump(&mut self) -> Result<bool, LinkError>;
    /// Whether the poll loop must call [`StreamSink::pump`] again soon without an event to wake it
    /// (bytes wait for credits or completions that no file descriptor announces).
    fn wants_poll(&self) -> bool {
        false
    }
    fn stats(&self) -> LinkStats {
        LinkStats::default()
    }
}

/// The standby's end of the data stream.
pub trait StreamSource {
    /// Moves the stream bytes that arrived into `reader`, about `budget` bytes at most; returns how many.
    /// An error means the stream cannot be trusted any more (or is gone).
    fn receive(&mut self, reader: &mut MessageReader, budget: usize) -> Result<usize, LinkError>;
    /// Whether the poll loop must call [`StreamSource::receive`] without an event to wake it.
    fn wants_poll(&self) -> bool {
        false
    }
    fn stats(&self) -> LinkStats {
        LinkStats::default()
    }
}

/// Bytes read from a socket per call.
const READ_CHUNK: usize = 256 << 10;

/// The control connection: a non-blocking TCP socket with its output queue. Control messages are
/// appended to [`TcpLink::out`]; with the TCP transport the data stream shares that queue (and the
/// socket), so `TcpLink` is also that transport's [`StreamSink`] and [`StreamSource`].
pub struct TcpLink {
    stream: mio::net::TcpStream,
    out: Vec<u8>,
    written: usize,
    high_water: usize,
    /// The peer closed its end (seen by a read that returned bytes before the end).
    eof: bool,
}

impl TcpLink {
    /// Wraps a connected non-blocking socket; the data stream stops taking messages once
    /// `high_water` bytes wait to be written.
    pub fn new(stream: mio::net::TcpStream, high_water: usize) -> TcpLink {
        TcpLink { stream, out: Vec::new(), written: 0, high_water, eof: false }
    }

    /// The socket, to register with a poll.
    pub fn stream(&mut self) -> &mut mio::net::TcpStream {
        &mut self.stream
    }

    /// The output queue: append whole messages; [`TcpLink::flush`] writes them.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Whether the peer closed its end; the bytes before the end were handed out.
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes as much of the output queue as the socket takes.
    pub fn flush(&mut self) -> io::Result<bool> {
        let before = self.written;
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let moved = self.written > before;
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        } else if self.written > (1 << 20) {
            self.out.drain(..self.written);
            self.written = 0;
        }
        Ok(moved)
    }
}

impl StreamSink for TcpLink {
    fn room(&self) -> usize {
        self.high_water.saturating_sub(self.pending())
    }

    fn queue(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    fn pump(&mut self) -> Result<bool, LinkError> {
        Ok(self.flush()?)
    }
}

impl StreamSource for TcpLink {
    fn receive(&mut self, reader: &mut MessageReader, budget: usize) -> Result<usize, LinkError> {
        if self.eof {
            return Err(LinkError::Closed);
        }
        let mut got = 0;
        while got < budget {
            let read = read_into_spare(&self.stream, reader.spare(READ_CHUNK));
            match read {
                Ok(0) => {
                    self.eof = true;
                    return if got > 0 { Ok(got) } else { Err(LinkError::Closed) };
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(got)
    }
}

/// Reads from `stream` into `buf`'s spare capacity and extends `buf` by what arrived. Not through
/// `Read::read` on a zero-filled tail: zeroing a 256 KiB chunk costs more than reading a few acks (the
/// replication link), or a request into a 64 KiB buffer (the kernel-socket workers, which use it too).
pub fn read_into_spare(stream: &mio::net::TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    // SAFETY: read(2) writes at most `spare.len()` bytes into memory `buf` owns and reads none of it.
    let n = unsafe { libc::read(stream.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised exactly `n` bytes after the current length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// An in-process data stream over a channel: the test double every transport test can use.
pub mod memory {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};

    /// How the in-memory link delivers the stream.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MemoryConfig {
        /// The standby receives the stream in pieces of at most this many bytes (at least 1).
        pub max_piece: usize,
        /// Flip every bit of the byte at this offset of the stream, as a corrupting network would.
        pub corrupt_at: Option<u64>,
        /// [`StreamSink::room`]: bytes queued and not yet received beyond this are refused.
        pub window: usize,
    }

    impl Default for MemoryConfig {
        fn default() -> Self {
            MemoryConfig { max_piece: usize::MAX, corrupt_at: None, window: 1 << 20 }
        }
    }

    /// The active's end of an in-memory stream.
    pub struct MemorySink {
        pieces: Sender<Vec<u8>>,
        queue: Vec<u8>,
        config: MemoryConfig,
        sent: u64,
        /// Bytes the source took, shared with it (the window's credit).
        received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    /// The standby's end of an in-memory stream.
    pub struct MemorySource {
        pieces: Receiver<Vec<u8>>,
        received: std::sync::Arc<std::sync::atomic::AtomicU64>,
        /// A piece taken off the channel and not yet fully handed out (the budget ran out).
        partial: Vec<u8>,
    }

    /// A connected pair of in-memory stream ends.
    pub fn pair(config: MemoryConfig) -> (MemorySink, MemorySource) {
        let (tx, rx) = channel();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sink = MemorySink { pieces: tx, queue: Vec::new(), config, sent: 0, received: received.clone() };
        (sink, MemorySource { pieces: rx, received, partial: Vec::new() })
    }

    impl StreamSink for MemorySink {
        fn room(&self) -> usize {
            let received = self.received.load(std::sync::atomic::Ordering::Acquire);
            let in_flight = (self.sent - received) as usize + self.queue.len();
            self.config.window.saturating_sub(in_flight)
        }

        fn queue(&mut self) -> &mut Vec<u8> {
            &mut self.queue
        }

        fn pump(&mut self) -> Result<bool, LinkError> {
            if self.queue.is_empty() {
                return Ok(false);
            }
            let start = self.sent;
            self.sent += self.queue.len() as u64;
            if let Some(at) = self.config.corrupt_at.filter(|&at| (start..self.sent).contains(&at)) {
                self.queue[(at - start) as usize] ^= 0xff;
            }
            for piece in self.queue.chunks(self.config.max_piece.max(1)) {
                self.pieces.send(piece.to_vec()).map_err(|_| LinkError::Closed)?;
            }
            self.queue.clear();
            Ok(true)
        }
    }

    impl StreamSource for MemorySource {
        fn receive(&mut self, reader: &mut MessageReader, budget: usize) -> Result<usize, LinkError> {
            let mut got = 0;
            while got < budget {
                if self.partial.is_empty() {
                    match self.pieces.try_recv() {
                        Ok(piece) => self.partial = piece,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) if got > 0 => break,
                        Err(TryRecvError::Disconnected) => return Err(LinkError::Closed),
                    }
                }
                let take = self.partial.len().min(budget - got);
                reader.feed(&self.partial[..take]);
                self.partial.drain(..take);
                got += take;
            }
            self.received.fetch_add(got as u64, std::sync::atomic::Ordering::Release);
            Ok(got)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::{pair, MemoryConfig};
    use super::*;
    use crate::frame::{begin_frame, finish_frame, FrameError};
    use crate::ids::{LogSeq, ShardId};
    use crate::log::{channel, Drained, LogConfig};
    use crate::record::{DecodeError, Record};
    use crate::wire::{self, Kind, Message, WireError};

    /// Ships every record in the log as Batch messages into `sink`, as much as its room allows; returns
    /// whether everything went.
    fn ship(consumer: &mut crate::log::LogConsumer, sink: &mut impl StreamSink) -> bool {
        loop {
            if sink.room() == 0 {
                return false;
            }
            let out = sink.queue();
            let message = wire::begin(Kind::Batch, out);
            let start = begin_frame(out);
            match consumer.drain_batch(256, out) {
                Drained::Batch { first_seq, count, .. } => {
                    finish_frame(out, start, consumer.shard(), first_seq, count).unwrap();
                    wire::finish(out, message);
                }
                Drained::Empty => {
                    out.truncate(message);
                    sink.pump().unwrap();
                    return true;
                }
                other => panic!("unexpected {other:?}"),
            }
            sink.pump().unwrap();
        }
    }

    fn log_with(keys: usize) -> crate::log::LogConsumer {
        let (mut producer, consumer) = channel(ShardId(2), LogSeq::ZERO, LogConfig::default());
        for number in 0..keys {
            let key = format!("key{number}");
            producer.append(&Record::Set { key: key.as_bytes(), flags: 0, expiry: 0, cas: 1, value: b"value" }).unwrap();
        }
        producer.flush();
        consumer
    }

    /// Every record the reader yields, as (seq, key).
    fn applied(reader: &mut MessageReader) -> Result<Vec<(u64, Vec<u8>)>, WireError> {
        let mut applied = Vec::new();
        while let Some(message) = reader.next_message()? {
            let Message::Batch(frame) = message else { panic!("only batches were sent") };
            applied.extend(frame.records().map(|r| (r.seq.0, r.record.key().unwrap().to_vec())));
        }
        Ok(applied)
    }

    #[test]
    fn records_cross_the_link_in_small_pieces_in_order() {
        let mut consumer = log_with(40);
        let (mut sink, mut source) = pair(MemoryConfig { max_piece: 7, ..MemoryConfig::default() });
        assert!(ship(&mut consumer, &mut sink));
        let mut reader = MessageReader::new(1 << 20);
        assert!(source.receive(&mut reader, usize::MAX).unwrap() > 0);
        let applied = applied(&mut reader).unwrap();
        assert_eq!(applied.len(), 40);
        assert!(applied.iter().enumerate().all(|(i, (seq, key))| *seq == i as u64 + 1 && *key == format!("key{i}").into_bytes()));
    }

    #[test]
    fn a_full_window_holds_the_stream_until_the_standby_reads() {
        let mut consumer = log_with(200);
        let (mut sink, mut source) = pair(MemoryConfig { window: 512, ..MemoryConfig::default() });
        let mut reader = MessageReader::new(1 << 20);
        let mut seen = Vec::new();
        let mut rounds = 0;
        while !ship(&mut consumer, &mut sink) {
            assert_eq!(sink.room(), 0);
            // A small budget: the source hands out part of a piece and keeps the rest.
            source.receive(&mut reader, 100).unwrap();
            seen.extend(applied(&mut reader).unwrap());
            rounds += 1;
        }
        source.receive(&mut reader, usize::MAX).unwrap();
        seen.extend(applied(&mut reader).unwrap());
        assert!(rounds > 3, "the window held the sender back {rounds} times");
        assert_eq!(seen.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn a_corrupted_byte_on_the_link_is_caught_by_the_reader() {
        let mut consumer = log_with(10);
        // Offset 45 lies inside the first record of the first message.
        let (mut sink, mut source) = pair(MemoryConfig { max_piece: 3, corrupt_at: Some(45), ..MemoryConfig::default() });
        ship(&mut consumer, &mut sink);
        let mut reader = MessageReader::new(1 << 20);
        source.receive(&mut reader, usize::MAX).unwrap();
        assert!(matches!(
            reader.next_message(),
            Err(WireError::Frame(FrameError::Record { index: 0, error: DecodeError::BadChecksum { .. } }))
        ));
    }

    #[test]
    fn a_dropped_end_is_reported_as_closed() {
        let (mut sink, source) = pair(MemoryConfig::default());
        drop(source);
        sink.queue().extend_from_slice(b"x");
        assert!(matches!(sink.pump(), Err(LinkError::Closed)));

        let (sink, mut source) = pair(MemoryConfig::default());
        drop(sink);
        assert!(matches!(source.receive(&mut MessageReader::new(64), usize::MAX), Err(LinkError::Closed)));
    }

    #[test]
    fn the_tcp_link_carries_the_stream_and_reports_the_close() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        server.set_nonblocking(true).unwrap();
        let mut active = TcpLink::new(mio::net::TcpStream::from_std(server), 1 << 20);
        let mut standby = TcpLink::new(mio::net::TcpStream::from_std(client), 1 << 20);
        let mut consumer = log_with(30);
        assert!(ship(&mut consumer, &mut active));
        let mut reader = MessageReader::new(1 << 20);
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen.len() < 30 && std::time::Instant::now() < deadline {
            active.pump().unwrap();
            standby.receive(&mut reader, usize::MAX).unwrap();
            seen.extend(applied(&mut reader).unwrap());
        }
        assert_eq!(seen.len(), 30);
        drop(active);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match standby.receive(&mut reader, usize::MAX) {
                Err(LinkError::Closed) => break,
                Ok(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(1)),
                other => panic!("expected the close, got {other:?}"),
            }
        }
    }
}
