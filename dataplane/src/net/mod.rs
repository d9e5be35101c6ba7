//! Network backends: where bytes come from and go to.
//!
//! - [`kernel`]: kernel TCP sockets, one SO_REUSEPORT listener per worker, polled with epoll (mio).
//!   The default; runs anywhere without privileges.

pub mod kernel;
