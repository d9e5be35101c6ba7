//! Fuzz target `meta`: arbitrary bytes into the meta command parser, request after request, the way a
//! connection drives it. The parser must never panic, never claim more bytes than it was given, and
//! always make progress or ask for more.
#![no_main]

use dataplane::protocol::{meta, Limits, Parse, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small -I so that the too-large path is reachable.
    let limits = Limits { item_size_max: 512 };
    let mut rest = data;
    let mut out = Vec::new();
    loop {
        match meta::parse(rest, &limits) {
            Parse::Request { request, consumed } => {
                assert!(consumed > 0 && consumed <= rest.len(), "consumed {consumed} of {}", rest.len());
                match meta::route(&request) {
                    Route::Key(key) => assert!(!key.is_empty() && key.len() <= 250),
                    Route::Connection => {
                        meta::answer(&request, &mut out);
                    }
                    other => panic!("meta request routed to {other:?}"),
                }
                // Parsing is a pure function of the bytes: the owning core re-parses the same request.
                let again = meta::parse(&rest[..consumed], &limits);
                assert_eq!(format!("{again:?}"), format!("{:?}", Parse::Request { request, consumed }));
                rest = &rest[consumed..];
            }
            Parse::Incomplete => break,
            Parse::Invalid(invalid) => {
                assert!(invalid.consumed <= rest.len());
                if invalid.close || invalid.consumed == 0 {
                    break;
                }
                rest = &rest[(invalid.consumed + invalid.swallow).min(rest.len())..];
            }
        }
    }
});
