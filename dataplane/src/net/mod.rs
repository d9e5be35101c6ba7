//! Network backends. `kernel`: epoll over kernel sockets, the default.
