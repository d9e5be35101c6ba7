//! One client connection on its worker: input buffer, and replies kept in request order.
//!
//! Requests run where their keys live, so replies can come back out of order: a request for a remote
//! shard leaves a *waiting slot*, and anything answered after it waits behind it in a ready slot. When a
//! remote reply fills the front slot, every ready slot behind it moves to the output in order. With no
//! waiting slot, replies are written straight to the output buffer (the common, all-local case costs
//! no slot at all).

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::mailbox::Proto;

/// A reply not yet in the output: waiting for another core, or ready behind one that waits.
enum Slot {
    Waiting,
    Ready(Vec<u8>),
}

/// A connection over a transport whose handle is `S` (see [`crate::net::Transport`]).
pub struct Conn<S> {
    pub stream: S,
    pub peer: Option<SocketAddr>,
    pub generation: u32,
    /// Decided by the first byte received.
    pub proto: Option<Proto>,
    /// Unparsed input (empty for idle connections: reads go through the worker's scratch buffer).
    pub input: Vec<u8>,
    /// Bytes of a refused value still to be dropped as they arrive.
    pub swallow: usize,
    /// Replies ready to write, in order.
    pub output: Vec<u8>,
    /// How much of `output` is already written.
    pub written: usize,
    slots: VecDeque<Slot>,
    /// Sequence number of `slots.front()`.
    first_slot: u64,
    /// Bytes held in ready slots (kept as a count: [`Conn::backlog`] runs before every request).
    parked: usize,
    /// Stop reading; close once the output is flushed.
    pub closing: bool,
    /// Sync replication: the output may be written only once each (shard, log position) here is
    /// acknowledged by the standby.
    pub holds: Vec<(usize, u64)>,
}

/// Output beyond which a connection stops reading requests until the client reads its replies.
pub const OUTPUT_HIGH_WATER: usize = 4 << 20;

impl<S> Conn<S> {
    pub fn new(stream: S, peer: Option<SocketAddr>, generation: u32) -> Conn<S> {
        Conn {
            stream,
            peer,
            generation,
            proto: None,
            input: Vec::new(),
            swallow: 0,
            output: Vec::new(),
            written: 0,
            slots: VecDeque::new(),
            first_slot: 0,
            parked: 0,
            closing: false,
            holds: Vec::new(),
        }
    }

    /// Whether a reply written now may go straight to the output.
    #[inline]
    pub fn in_order(&self) -> bool {
        self.slots.is_empty()
    }

    /// Opens a slot for a reply another core will produce; returns its sequence number.
    pub fn reserve_slot(&mut self) -> u64 {
        self.slots.push_back(Slot::Waiting);
        self.first_slot + self.slots.len() as u64 - 1
    }

    /// Queues bytes answered locally behind waiting slots.
    pub fn push_ready(&mut self, bytes: Vec<u8>) {
        self.parked += bytes.len();
        self.slots.push_back(Slot::Ready(bytes));
    }

    /// Fills slot `seq` with a remote reply, then moves every ready slot at the front to the output.
    /// Returns the buffers released, for the caller's pool.
    pub fn fill_slot(&mut self, seq: u64, bytes: Vec<u8>, mut release: impl FnMut(Vec<u8>)) {
        let Some(pos) = seq.checked_sub(self.first_slot) else { return release(bytes) };
        match self.slots.get_mut(pos as usize) {
            Some(slot @ Slot::Waiting) => {
                self.parked += bytes.len();
                *slot = Slot::Ready(bytes);
            }
            _ => return release(bytes),
        }
        while let Some(Slot::Ready(_)) = self.slots.front() {
            if let Some(Slot::Ready(buf)) = self.slots.pop_front() {
                self.parked -= buf.len();
                self.output.extend_from_slice(&buf);
                release(buf);
            }
            self.first_slot += 1;
        }
    }

    /// Bytes queued but not yet written, including replies parked in slots.
    pub fn backlog(&self) -> usize {
        self.output.len() - self.written + self.parked
    }

    /// Sync replication: what is queued now may be written only after `shard`'s log is acknowledged
    /// through `seq`.
    pub fn hold(&mut self, shard: usize, seq: u64) {
        match self.holds.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, held)) => *held = (*held).max(seq),
            None => self.holds.push((shard, seq)),
        }
    }

    /// Drops the holds `acked` says are satisfied; returns whether the output may be written.
    pub fn release_holds(&mut self, acked: impl Fn(usize, u64) -> bool) -> bool {
        self.holds.retain(|&(shard, seq)| !acked(shard, seq));
        self.holds.is_empty()
    }

    /// Whether replies are still expected from other cores.
    pub fn awaiting_replies(&self) -> bool {
        !self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn<()> {
        Conn::new((), None, 0)
    }

    #[test]
    fn remote_replies_are_released_in_request_order() {
        let mut c = conn();
        c.output.extend_from_slice(b"A");
        let s1 = c.reserve_slot();
        c.push_ready(b"C".to_vec());
        let s3 = c.reserve_slot();
        c.push_ready(b"E".to_vec());
        let mut released = 0;
        c.fill_slot(s3, b"D".to_vec(), |_| released += 1);
        assert_eq!(c.output, b"A");
        assert_eq!(c.backlog(), 4, "A written, C D E parked");
        c.fill_slot(s1, b"B".to_vec(), |_| released += 1);
        assert_eq!(c.output, b"ABCDE");
        assert!(c.in_order());
        assert_eq!(c.backlog(), 5);
        assert_eq!(released, 4);
        // A stale reply (slot already filled) is dropped.
        c.fill_slot(s1, b"X".to_vec(), |_| released += 1);
        assert_eq!(c.output, b"ABCDE");
    }
}
