//! ARP shared between the workers of one port.
//!
//! Every worker's stack has the node's address and MAC but sees only the frames of its own NIC queue.
//! A NIC spreads TCP flows over queues by a hash of their addresses and ports, but ARP has no ports:
//! all of it lands on one queue (net_af_packet puts it on queue 0). A worker whose SYN-ACK needs the
//! client's MAC would ask, and never hear the answer. So every ARP frame a worker receives is also
//! handed to every other worker of the port, whose stack learns from it as if it had arrived there.
//! (A request may then be answered more than once, with the same MAC: harmless.)

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::time::Instant;

use crate::net::stack::Phy;

/// ARP frames waiting for one worker; a full inbox drops (ARP is retried).
const INBOX_FRAMES: usize = 256;

const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

/// The inboxes of all workers of one port.
pub struct ArpExchange {
    inboxes: Vec<ArrayQueue<Vec<u8>>>,
}

impl ArpExchange {
    pub fn new(workers: usize) -> Arc<ArpExchange> {
        Arc::new(ArpExchange { inboxes: (0..workers).map(|_| ArrayQueue::new(INBOX_FRAMES)).collect() })
    }
}

/// Worker `me`'s device `P`, with ARP from and to the other workers.
pub struct ArpShare<P> {
    inner: P,
    me: usize,
    exchange: Arc<ArpExchange>,
    /// ARP frames handed to other workers, and received from them.
    pub shared_out: u64,
    pub shared_in: u64,
}

impl<P> ArpShare<P> {
    pub fn new(inner: P, me: usize, exchange: Arc<ArpExchange>) -> ArpShare<P> {
        ArpShare { inner, me, exchange, shared_out: 0, shared_in: 0 }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }
}

/// A frame from the NIC (copied to the other workers if it is ARP), or one another worker passed on.
pub enum SharedRx<'a, T> {
    Nic { token: T, me: usize, exchange: &'a ArpExchange, shared: &'a mut u64 },
    Passed(Vec<u8>),
}

impl<T: phy::RxToken> phy::RxToken for SharedRx<'_, T> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self {
            SharedRx::Nic { token, me, exchange, shared } => token.consume(|frame| {
                if exchange.inboxes.len() > 1 && frame.get(12..14) == Some(&ETHERTYPE_ARP[..]) {
                    for (worker, inbox) in exchange.inboxes.iter().enumerate() {
                        if worker != me && inbox.push(frame.to_vec()).is_ok() {
                            *shared += 1;
                        }
                    }
                }
                f(frame)
            }),
            SharedRx::Passed(frame) => f(&frame),
        }
    }
}

impl<P: Device> Device for ArpShare<P> {
    type RxToken<'a> = SharedRx<'a, P::RxToken<'a>> where P: 'a;
    type TxToken<'a> = P::TxToken<'a> where P: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if let Some(frame) = self.exchange.inboxes[self.me].pop() {
            self.shared_in += 1;
            let tx = self.inner.transmit(timestamp)?;
            return Some((SharedRx::Passed(frame), tx));
        }
        let (token, tx) = self.inner.receive(timestamp)?;
        Some((SharedRx::Nic { token, me: self.me, exchange: &self.exchange, shared: &mut self.shared_out }, tx))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

impl<P: Phy> Phy for ArpShare<P> {
    fn flush(&mut self) {
        self.inner.flush();
    }

    fn counters(&self, out: &mut Vec<(&'static str, u64)>) {
        out.extend([("arp_shared_out", self.shared_out), ("arp_shared_in", self.shared_in)]);
        self.inner.counters(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::stack::memory::wire;

    fn frame(ethertype: [u8; 2]) -> Vec<u8> {
        let mut f = vec![0xff; 12];
        f.extend_from_slice(&ethertype);
        f.extend_from_slice(&[0; 28]);
        f
    }

    fn send(end: &mut crate::net::stack::memory::MemoryPhy, bytes: Vec<u8>) {
        phy::TxToken::consume(end.transmit(Instant::from_millis(0)).unwrap(), bytes.len(), |b| b.copy_from_slice(&bytes));
    }

    fn receive_all<P: Device>(dev: &mut P) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Some((rx, _)) = dev.receive(Instant::from_millis(0)) {
            got.push(phy::RxToken::consume(rx, |f| f.to_vec()));
        }
        got
    }

    #[test]
    fn arp_reaching_one_worker_reaches_them_all_and_tcp_stays_put() {
        let exchange = ArpExchange::new(3);
        let (nic0, mut peer0) = wire();
        let (nic1, _peer1) = wire();
        let (nic2, _peer2) = wire();
        let mut w0 = ArpShare::new(nic0, 0, exchange.clone());
        let mut w1 = ArpShare::new(nic1, 1, exchange.clone());
        let mut w2 = ArpShare::new(nic2, 2, exchange.clone());
        send(&mut peer0, frame(ETHERTYPE_ARP));
        send(&mut peer0, frame([0x08, 0x00]));
        assert_eq!(receive_all(&mut w0).len(), 2, "worker 0 gets both frames from its queue");
        assert_eq!(receive_all(&mut w1), vec![frame(ETHERTYPE_ARP)], "the ARP frame is passed on, the IPv4 one is not");
        assert_eq!(receive_all(&mut w2), vec![frame(ETHERTYPE_ARP)]);
        assert_eq!((w0.shared_out, w1.shared_in, w2.shared_in), (2, 1, 1));
        assert!(receive_all(&mut w1).is_empty(), "passed on once");
    }
}
