//! Network backends: where bytes come from and go to.
//!
//! - [`kernel`]: kernel TCP sockets, one SO_REUSEPORT listener per worker, polled with epoll (mio).
//!   The default; runs anywhere without privileges.
//! - [`takeover`]: claiming and releasing the service address (netlink) and announcing it with
//!   gratuitous ARPs (packet socket), in kernel mode.
//! - [`witness`]: whether the failover witness answers (ICMP echo).
//! - [`phy`] (feature `dpdk`): network devices for the userspace dataplane (DPDK queue pairs as smoltcp
//!   devices).

pub mod kernel;
#[cfg(feature = "dpdk")]
pub mod phy;
pub mod takeover;
pub mod witness;
