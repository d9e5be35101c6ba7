//! Fuzzes the text protocol parser: arbitrary bytes, parsed request after request as a connection would
//! (dropping what each parse consumed, skipping what it swallows), must never panic, never claim more
//! bytes than it was given, and always make progress unless it waits or closes. Each multi-key retrieval's
//! key frames must re-parse to one-key retrievals of the same key.

#![no_main]

use dataplane::protocol::text::TextCodec;
use dataplane::protocol::{Codec, Limits, Parse, Route};
use libfuzzer_sys::fuzz_target;

/// Small, so refused values and their swallowing are reached by short inputs.
const LIMITS: Limits = Limits { item_size_max: 1024 };

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut frame = Vec::new();
    let mut reply = Vec::new();
    loop {
        match TextCodec::parse(rest, &LIMITS) {
            Parse::Incomplete => break,
            Parse::Invalid(invalid) => {
                assert!(invalid.consumed <= rest.len());
                if invalid.close {
                    break;
                }
                assert!(invalid.consumed > 0, "an invalid line is dropped");
                rest = &rest[invalid.consumed..];
                rest = &rest[invalid.swallow.min(rest.len())..];
            }
            Parse::Request { request, consumed } => {
                assert!(consumed > 0 && consumed <= rest.len());
                match TextCodec::route(&request) {
                    Route::Keys(count) => {
                        for index in 0..count {
                            let key = TextCodec::key_at(&request, index);
                            frame.clear();
                            TextCodec::key_frame(&request, index, &mut frame);
                            match TextCodec::parse(&frame, &LIMITS) {
                                Parse::Request { request: single, consumed } => {
                                    assert_eq!(consumed, frame.len());
                                    assert!(matches!(TextCodec::route(&single), Route::Keys(1)));
                                    assert_eq!(TextCodec::key_at(&single, 0), key);
                                }
                                other => panic!("key frame {frame:?} parsed as {other:?}"),
                            }
                        }
                    }
                    Route::Connection => {
                        reply.clear();
                        TextCodec::answer(&request, &mut reply);
                    }
                    Route::Key(key) => assert!(!key.is_empty()),
                    Route::Admin(_) | Route::AllShards | Route::SlabClass(_) => {}
                }
                rest = &rest[consumed..];
            }
        }
    }
});
