//! Fault injection under the userspace stack: drops a configured share of frames in both directions
//! (`drop_percent` in `[net.dpdk]` / `[net.tap]`, 0 by default), to show that TCP recovery in the stack
//! keeps every reply right on a lossy link. With 0 it only forwards.

use smoltcp::phy::{self, Device, DeviceCapabilities};
use smoltcp::time::Instant;

use crate::net::stack::Phy;

/// `P` with `drop_percent`% of received and of transmitted frames lost.
pub struct Lossy<P> {
    inner: P,
    drop_percent: u8,
    rng: u64,
    /// Frames dropped on purpose, received and transmitted.
    pub dropped_rx: u64,
    pub dropped_tx: u64,
}

impl<P> Lossy<P> {
    pub fn new(inner: P, drop_percent: u8, seed: u64) -> Lossy<P> {
        Lossy { inner, drop_percent: drop_percent.min(100), rng: seed | 1, dropped_rx: 0, dropped_tx: 0 }
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Whether the next frame is lost (xorshift64: cheap, and good enough to spread losses).
    fn lose(&mut self) -> bool {
        if self.drop_percent == 0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 100) < self.drop_percent as u64
    }
}

/// A transmit token that may throw its frame away (counted only if a frame is really written).
pub struct MaybeTx<'a, T> {
    token: T,
    lose: bool,
    dropped: &'a mut u64,
}

impl<T: phy::TxToken> phy::TxToken for MaybeTx<'_, T> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.lose {
            *self.dropped += 1;
            let mut scratch = vec![0; len];
            return f(&mut scratch);
        }
        self.token.consume(len, f)
    }
}

impl<P: Device> Device for Lossy<P> {
    type RxToken<'a> = P::RxToken<'a> where P: 'a;
    type TxToken<'a> = MaybeTx<'a, P::TxToken<'a>> where P: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        while self.drop_percent > 0 && self.lose() {
            let (rx, _) = self.inner.receive(timestamp)?;
            phy::RxToken::consume(rx, |_| ());
            self.dropped_rx += 1;
        }
        let lose = self.lose();
        let (rx, tx) = self.inner.receive(timestamp)?;
        Some((rx, MaybeTx { token: tx, lose, dropped: &mut self.dropped_tx }))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let lose = self.lose();
        Some(MaybeTx { token: self.inner.transmit(timestamp)?, lose, dropped: &mut self.dropped_tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

impl<P: Phy> Phy for Lossy<P> {
    fn flush(&mut self) {
        self.inner.flush();
    }

    fn counters(&self, out: &mut Vec<(&'static str, u64)>) {
        if self.drop_percent > 0 {
            out.extend([("injected_rx_drops", self.dropped_rx), ("injected_tx_drops", self.dropped_tx)]);
        }
        self.inner.counters(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::stack::memory::wire;

    #[test]
    fn drops_about_the_share_asked_and_nothing_at_zero() {
        let (a, mut b) = wire();
        let mut lossy = Lossy::new(a, 10, 42);
        for _ in 0..10_000 {
            if let Some(tx) = lossy.transmit(Instant::from_millis(0)) {
                phy::TxToken::consume(tx, 60, |buf| buf[0] = 1);
            }
        }
        let mut arrived = 0;
        while let Some((rx, _)) = b.receive(Instant::from_millis(0)) {
            phy::RxToken::consume(rx, |_| ());
            arrived += 1;
        }
        assert_eq!(arrived + lossy.dropped_tx, 10_000);
        assert!((700..1300).contains(&lossy.dropped_tx), "{} of 10000 dropped at 10%", lossy.dropped_tx);

        let (a, mut b) = wire();
        let mut clean = Lossy::new(a, 0, 42);
        for _ in 0..1000 {
            phy::TxToken::consume(clean.transmit(Instant::from_millis(0)).unwrap(), 60, |_| ());
        }
        let mut arrived = 0;
        while b.receive(Instant::from_millis(0)).is_some() {
            arrived += 1;
        }
        assert_eq!((arrived, clean.dropped_tx), (1000, 0));
    }
}
