//! Fuzz target `binary`: arbitrary bytes fed to the binary protocol parser the way a connection feeds
//! it, request after request. It must never panic, never consume more than it was given, every
//! request it accepts must route, encode and parse back to itself, and `peek_key` must agree with it.

#![no_main]

use dataplane::protocol::binary::BinaryCodec;
use dataplane::protocol::{Codec, Limits, Parse, Route};
use libfuzzer_sys::fuzz_target;

/// Small, so that refusing a value larger than the limit is reached by short inputs.
const LIMITS: Limits = Limits { item_size_max: 512 };

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut out = Vec::new();
    loop {
        let peeked = BinaryCodec::peek_key(rest);
        match BinaryCodec::parse(rest, &LIMITS) {
            Parse::Request { request, consumed } => {
                assert!(consumed > 0 && consumed <= rest.len(), "consumed {consumed} of {}", rest.len());
                // The worker prefetches by what a glance at the header says: it must be this request's.
                if let Some((key, len)) = peeked {
                    assert_eq!((key, len), (request.key, consumed), "peek_key disagrees with parse");
                }
                if let Route::Connection = BinaryCodec::route(&request) {
                    out.clear();
                    BinaryCodec::answer(&request, &mut out);
                }
                out.clear();
                request.encode(&mut out);
                match BinaryCodec::parse(&out, &LIMITS) {
                    Parse::Request { request: again, consumed } => {
                        assert_eq!(again, request);
                        assert_eq!(consumed, out.len());
                    }
                    other => panic!("{request:?} encoded as {out:?} parsed as {other:?}"),
                }
                rest = &rest[consumed..];
            }
            Parse::Incomplete => break,
            Parse::Invalid(invalid) => {
                assert!(invalid.consumed <= rest.len(), "consumed {} of {}", invalid.consumed, rest.len());
                if invalid.close {
                    break;
                }
                assert!(invalid.consumed > 0, "a kept connection must make progress");
                rest = &rest[invalid.consumed..];
                // What a connection swallows as it arrives.
                rest = &rest[invalid.swallow.min(rest.len())..];
            }
        }
    }
});
