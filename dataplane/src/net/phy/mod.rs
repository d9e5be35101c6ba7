//! Devices under the userspace stack ([`super::stack::Phy`]): one per worker, and the layers between
//! a device and its smoltcp interface.
//!
//! - [`dpdk`] (feature `dpdk`): a DPDK port's rx/tx queue pairs, one smoltcp device per queue, each
//!   driven by one core.
//! - [`hugepages`]: whether DPDK's EAL will find hugepages, asked before it starts.
//! - [`tap`]: a Linux tap device, for trying the userspace stack without DPDK (one queue, one worker).
//! - [`check`]: drops and counts truncated frames, bad checksums and unknown ethertypes.
//! - [`arp_share`]: passes ARP between the workers of one multi-queue port.
//! - [`lossy`]: drops a share of frames (fault injection for tests).

pub mod arp_share;
pub mod check;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod hugepages;
pub mod lossy;
pub mod tap;
