//! Helpers for Tandem integration tests: start tandemd and memcached, talk to them.
