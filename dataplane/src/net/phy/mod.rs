//! Devices under the userspace stack ([`super::stack::Phy`]): one per worker.
//!
//! - [`tap`]: a Linux tap device, for trying the userspace stack without DPDK (one queue, one worker).
//! - [`lossy`]: drops a share of frames over any of them (fault injection for tests).

pub mod lossy;
pub mod tap;
