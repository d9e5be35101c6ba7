//! Parser tests (exact bytes, byte-by-byte feeding, property round trips) and executor tests that
//! wait for the store engine.
