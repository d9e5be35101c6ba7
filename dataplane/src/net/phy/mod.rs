//! Access to network hardware for the userspace dataplane: devices that hand Ethernet frames to a
//! smoltcp interface.
//!
//! - [`dpdk`] (feature `dpdk`): a DPDK port's rx/tx queue pairs, one smoltcp device per queue, each
//!   driven by one core.

#[cfg(feature = "dpdk")]
pub mod dpdk;
