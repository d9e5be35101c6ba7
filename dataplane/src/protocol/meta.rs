//! meta commands codec (being written).
