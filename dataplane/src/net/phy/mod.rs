//! Devices under the userspace stack ([`super::stack::Phy`]): one per worker.
//!
//! - [`tap`]: a Linux tap device, for trying the userspace stack without DPDK (one queue, one worker).
//! - [`lossy`]: drops a share of frames over any of them (fault injection for tests).
//! - [`arp_share`]: passes ARP between the workers of one multi-queue port.
//! - [`check`]: drops and counts truncated frames, bad checksums and unknown ethertypes.

pub mod arp_share;
pub mod check;
pub mod lossy;
pub mod tap;
