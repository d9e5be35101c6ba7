//! Worker threads pinned to CPUs, their poll loops, and the rings between them.
