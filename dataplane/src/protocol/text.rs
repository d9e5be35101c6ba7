//! memcached text protocol codec (being written).
