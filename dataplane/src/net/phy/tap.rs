//! A Linux tap device as the userspace stack's device: frames the kernel routes to the tap reach this
//! process's smoltcp, so the whole userspace path (stack, codecs, shards) can be tried with ordinary
//! clients on the same machine. One queue, so one worker; needs CAP_NET_ADMIN to create the device.

use std::io;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, TunTapInterface};
use smoltcp::time::Instant;

use crate::net::stack::Phy;

/// A tap device opened (and created if missing) by name.
pub struct TapPhy(TunTapInterface);

impl TapPhy {
    pub fn open(name: &str) -> io::Result<TapPhy> {
        TunTapInterface::new(name, Medium::Ethernet)
            .map(TapPhy)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open tap device {name:?} (needs CAP_NET_ADMIN): {e}")))
    }
}

impl Device for TapPhy {
    type RxToken<'a> = <TunTapInterface as Device>::RxToken<'a>;
    type TxToken<'a> = <TunTapInterface as Device>::TxToken<'a>;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.0.receive(timestamp)
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.0.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.0.capabilities()
    }
}

impl Phy for TapPhy {}
