//! The narrow interface between the replication logic and the wire, and an in-memory link for tests.
//!
//! Two small traits, one per end, both non-blocking (the caller's poll loop drives them; nothing here
//! spawns threads or blocks):
//! - [`ActiveLink`]: send a batch frame ([`crate::frame`]), collect per-shard [`Ack`]s, heartbeats.
//! - [`StandbyLink`]: feed received batch bytes to a [`FrameDecoder`], send [`Ack`]s, heartbeats.
//!
//! Batch framing, the decoder and the log ring live outside the transports, so every transport shares
//! them: the TCP transport (to come with the wiring step: frames and length-prefixed control messages
//! over a socket, after the [`crate::handshake`]) writes frames into the socket; the RDMA transport (to
//! come) writes the same frames into the standby's per-shard receive rings with one-sided WRITEs and
//! reads back credits, with setup and authentication over the TCP control channel.
//!
//! [`memory::pair`] is a real implementation over in-process queues, with knobs to deliver the byte
//! stream in small pieces and to corrupt one byte of it, so the decoder's reassembly and checks are
//! exercised without a network.

use crate::frame::FrameDecoder;
use crate::ids::{Epoch, LogSeq, ShardId};

/// The standby has applied every record of `shard` up to and including `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub shard: ShardId,
    pub seq: LogSeq,
}

/// "Still here": sent both ways; silence for longer than the configured time triggers failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender's epoch: a peer that hears a higher one steps down.
    pub epoch: Epoch,
    /// The sender's clock in milliseconds, echoed for round-trip measurement.
    pub sent_at_millis: u64,
}

/// The active's end of a replication link.
pub trait ActiveLink {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Queues one encoded batch frame (header and records) for the standby.
    fn send_batch(&mut self, frame: &[u8]) -> Result<(), Self::Error>;
    /// Appends the acknowledgements received since the last call to `acks`.
    fn poll_acks(&mut self, acks: &mut Vec<Ack>) -> Result<(), Self::Error>;
    fn send_heartbeat(&mut self, heartbeat: Heartbeat) -> Result<(), Self::Error>;
    /// The newest heartbeat received since the last call, if any.
    fn poll_heartbeat(&mut self) -> Result<Option<Heartbeat>, Self::Error>;
}

/// The standby's end of a replication link.
pub trait StandbyLink {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Feeds every batch byte received since the last call to `decoder`; returns how many.
    fn poll_batches(&mut self, decoder: &mut FrameDecoder) -> Result<usize, Self::Error>;
    fn send_ack(&mut self, ack: Ack) -> Result<(), Self::Error>;
    fn send_heartbeat(&mut self, heartbeat: Heartbeat) -> Result<(), Self::Error>;
    /// The newest heartbeat received since the last call, if any.
    fn poll_heartbeat(&mut self) -> Result<Option<Heartbeat>, Self::Error>;
}

/// In-process links over channels: the test double every transport test can use.
pub mod memory {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
    use thiserror::Error;

    /// How the in-memory link delivers the batch stream.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MemoryConfig {
        /// The standby receives the stream in pieces of at most this many bytes (at least 1).
        pub max_piece: usize,
        /// Flip every bit of the byte at this offset of the batch stream, as a corrupting network would.
        pub corrupt_at: Option<u64>,
    }

    impl Default for MemoryConfig {
        fn default() -> Self {
            MemoryConfig { max_piece: usize::MAX, corrupt_at: None }
        }
    }

    /// The other end is gone.
    #[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
    #[error("replication link closed by the peer")]
    pub struct Closed;

    /// The active's end of an in-memory link.
    pub struct MemoryActive {
        batches: Sender<Vec<u8>>,
        acks: Receiver<Ack>,
        heartbeats_out: Sender<Heartbeat>,
        heartbeats_in: Receiver<Heartbeat>,
        config: MemoryConfig,
        sent: u64,
    }

    /// The standby's end of an in-memory link.
    pub struct MemoryStandby {
        batches: Receiver<Vec<u8>>,
        acks: Sender<Ack>,
        heartbeats_out: Sender<Heartbeat>,
        heartbeats_in: Receiver<Heartbeat>,
    }

    /// A connected pair of in-memory link ends.
    pub fn pair(config: MemoryConfig) -> (MemoryActive, MemoryStandby) {
        let (batches_tx, batches_rx) = channel();
        let (acks_tx, acks_rx) = channel();
        let (to_standby_tx, to_standby_rx) = channel();
        let (to_active_tx, to_active_rx) = channel();
        let active = MemoryActive {
            batches: batches_tx,
            acks: acks_rx,
            heartbeats_out: to_standby_tx,
            heartbeats_in: to_active_rx,
            config,
            sent: 0,
        };
        let standby = MemoryStandby {
            batches: batches_rx,
            acks: acks_tx,
            heartbeats_out: to_active_tx,
            heartbeats_in: to_standby_rx,
        };
        (active, standby)
    }

    /// The newest of the heartbeats waiting in `queue`.
    fn newest(queue: &Receiver<Heartbeat>) -> Result<Option<Heartbeat>, Closed> {
        let mut newest = None;
        loop {
            match queue.try_recv() {
                Ok(heartbeat) => newest = Some(heartbeat),
                Err(TryRecvError::Empty) => return Ok(newest),
                Err(TryRecvError::Disconnected) => return newest.map(Some).ok_or(Closed),
            }
        }
    }

    impl ActiveLink for MemoryActive {
        type Error = Closed;

        fn send_batch(&mut self, frame: &[u8]) -> Result<(), Closed> {
            let start = self.sent;
            self.sent += frame.len() as u64;
            let mut frame = frame.to_vec();
            if let Some(at) = self.config.corrupt_at.filter(|&at| (start..self.sent).contains(&at)) {
                frame[(at - start) as usize] ^= 0xff;
            }
            for piece in frame.chunks(self.config.max_piece.max(1)) {
                self.batches.send(piece.to_vec()).map_err(|_| Closed)?;
            }
            Ok(())
        }

        fn poll_acks(&mut self, acks: &mut Vec<Ack>) -> Result<(), Closed> {
            loop {
                match self.acks.try_recv() {
                    Ok(ack) => acks.push(ack),
                    Err(TryRecvError::Empty) => return Ok(()),
                    Err(TryRecvError::Disconnected) => return Err(Closed),
                }
            }
        }

        fn send_heartbeat(&mut self, heartbeat: Heartbeat) -> Result<(), Closed> {
            self.heartbeats_out.send(heartbeat).map_err(|_| Closed)
        }

        fn poll_heartbeat(&mut self) -> Result<Option<Heartbeat>, Closed> {
            newest(&self.heartbeats_in)
        }
    }

    impl StandbyLink for MemoryStandby {
        type Error = Closed;

        fn poll_batches(&mut self, decoder: &mut FrameDecoder) -> Result<usize, Closed> {
            let mut fed = 0;
            loop {
                match self.batches.try_recv() {
                    Ok(piece) => {
                        decoder.feed(&piece);
                        fed += piece.len();
                    }
                    Err(TryRecvError::Empty) => return Ok(fed),
                    Err(TryRecvError::Disconnected) if fed > 0 => return Ok(fed),
                    Err(TryRecvError::Disconnected) => return Err(Closed),
                }
            }
        }

        fn send_ack(&mut self, ack: Ack) -> Result<(), Closed> {
            self.acks.send(ack).map_err(|_| Closed)
        }

        fn send_heartbeat(&mut self, heartbeat: Heartbeat) -> Result<(), Closed> {
            self.heartbeats_out.send(heartbeat).map_err(|_| Closed)
        }

        fn poll_heartbeat(&mut self) -> Result<Option<Heartbeat>, Closed> {
            newest(&self.heartbeats_in)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::{pair, Closed, MemoryConfig};
    use super::*;
    use crate::frame::{begin_frame, finish_frame, FrameError};
    use crate::log::{channel, Drained, LogConfig};
    use crate::record::{DecodeError, Record};

    /// Ships every record in the log as frames over `link`, draining straight into the frame buffer.
    fn ship(consumer: &mut crate::log::LogConsumer, link: &mut impl ActiveLink) {
        let mut frame = Vec::new();
        loop {
            frame.clear();
            let start = begin_frame(&mut frame);
            match consumer.drain_batch(256, &mut frame) {
                Drained::Batch { first_seq, count, .. } => {
                    finish_frame(&mut frame, start, consumer.shard(), first_seq, count).unwrap();
                    link.send_batch(&frame).unwrap();
                }
                Drained::Empty => return,
                other => panic!("unexpected {other:?}"),
            }
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

    #[test]
    fn records_cross_the_link_in_small_pieces_and_acks_come_back() {
        let mut consumer = log_with(40);
        let (mut active, mut standby) = pair(MemoryConfig { max_piece: 7, corrupt_at: None });
        ship(&mut consumer, &mut active);

        let mut decoder = FrameDecoder::default();
        assert!(standby.poll_batches(&mut decoder).unwrap() > 0);
        let mut applied = Vec::new();
        while let Some(frame) = decoder.next_frame().unwrap() {
            applied.extend(frame.records().map(|r| (r.seq.0, r.record.key().unwrap().to_vec())));
        }
        assert_eq!(applied.len(), 40);
        assert!(applied.iter().enumerate().all(|(i, (seq, key))| *seq == i as u64 + 1 && *key == format!("key{i}").into_bytes()));

        standby.send_ack(Ack { shard: ShardId(2), seq: LogSeq(40) }).unwrap();
        let mut acks = Vec::new();
        active.poll_acks(&mut acks).unwrap();
        assert_eq!(acks, vec![Ack { shard: ShardId(2), seq: LogSeq(40) }]);
    }

    #[test]
    fn heartbeats_go_both_ways_and_only_the_newest_counts() {
        let (mut active, mut standby) = pair(MemoryConfig::default());
        assert_eq!(standby.poll_heartbeat(), Ok(None));
        active.send_heartbeat(Heartbeat { epoch: Epoch(3), sent_at_millis: 1 }).unwrap();
        active.send_heartbeat(Heartbeat { epoch: Epoch(3), sent_at_millis: 2 }).unwrap();
        assert_eq!(standby.poll_heartbeat(), Ok(Some(Heartbeat { epoch: Epoch(3), sent_at_millis: 2 })));
        standby.send_heartbeat(Heartbeat { epoch: Epoch(3), sent_at_millis: 5 }).unwrap();
        assert_eq!(active.poll_heartbeat(), Ok(Some(Heartbeat { epoch: Epoch(3), sent_at_millis: 5 })));
    }

    #[test]
    fn a_corrupted_byte_on_the_link_is_caught_by_the_decoder() {
        let mut consumer = log_with(10);
        // Offset 40 lies inside the first record of the first frame.
        let (mut active, mut standby) = pair(MemoryConfig { max_piece: 3, corrupt_at: Some(40) });
        ship(&mut consumer, &mut active);
        let mut decoder = FrameDecoder::default();
        standby.poll_batches(&mut decoder).unwrap();
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::Record { index: 0, error: DecodeError::BadChecksum { .. } })
        ));
    }

    #[test]
    fn a_dropped_end_is_reported_as_closed() {
        let (mut active, standby) = pair(MemoryConfig::default());
        drop(standby);
        assert_eq!(active.send_batch(b"x"), Err(Closed));
        assert_eq!(active.poll_acks(&mut Vec::new()), Err(Closed));
        assert_eq!(active.poll_heartbeat(), Err(Closed));

        let (active, mut standby) = pair(MemoryConfig::default());
        drop(active);
        assert_eq!(standby.poll_batches(&mut FrameDecoder::default()), Err(Closed));
        assert_eq!(standby.send_ack(Ack { shard: ShardId(0), seq: LogSeq(1) }), Err(Closed));
    }
}
