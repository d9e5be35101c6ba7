//! memcached binary protocol codec (being written).
