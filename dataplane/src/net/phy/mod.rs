//! Devices under the userspace stack ([`super::stack::Phy`]): one per worker.
//!
//! - [`tap`]: a Linux tap device, for trying the userspace stack without DPDK (one queue, one worker).

pub mod tap;
