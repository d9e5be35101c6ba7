//! The per-core path with the network taken out: bytes of pipelined requests in, responses out, through
//! a codec and the store of one shard. What tandemd spends per request beyond the kernel's socket cost.
//!
//! `cargo bench -p dataplane --bench shard_path` (criterion; reports time per batch of 16 requests).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dataplane::config::Settings;
use dataplane::protocol::binary::BinaryCodec;
use dataplane::protocol::text::TextCodec;
use dataplane::protocol::{Codec, Limits, Parse, Route};
use dataplane::shard::Shard;
use dataplane::store::{Store, StoreConfig};

const KEYS: usize = 10_000;
const PIPELINE: usize = 16;
const VALUE: &[u8] = b"0123456789abcdef0123456789abcdef";

fn shard() -> Shard {
    let settings = Settings::default();
    let store = Store::new(StoreConfig {
        memory_bytes: 64 << 20,
        item_size_max: settings.item_size_max,
        evict: true,
        shard_index: 0,
        shard_count: 1,
        try_hugepages: false,
        memory_file: None,
        clock_origin: 0,
    })
    .expect("store");
    Shard::new(0, store, Arc::new(settings))
}

/// Runs every request in `input` on `shard`, as a worker does for keys it owns.
fn run<C: Codec>(shard: &mut Shard, input: &[u8], out: &mut Vec<u8>) {
    let limits = Limits { item_size_max: shard.settings.item_size_max };
    let mut pos = 0;
    while pos < input.len() {
        match C::parse(&input[pos..], &limits) {
            Parse::Request { request, consumed } => {
                match C::route(&request) {
                    Route::Key(_) => C::execute(shard, &request, out),
                    Route::AllShards | Route::SlabClass(_) => {
                        C::execute(shard, &request, out);
                        C::finish_keys(&request, out);
                    }
                    Route::Keys(n) => {
                        for i in 0..n {
                            C::execute_key(shard, &request, i, out);
                        }
                        C::finish_keys(&request, out);
                    }
                    Route::Connection | Route::Admin(_) => {
                        C::answer(&request, out);
                    }
                }
                pos += consumed;
            }
            other => panic!("benchmark input did not parse: {other:?}"),
        }
    }
}

fn text_sets(first: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..PIPELINE {
        wire.extend_from_slice(format!("set key:{:05} 0 0 {}\r\n", (first + i) % KEYS, VALUE.len()).as_bytes());
        wire.extend_from_slice(VALUE);
        wire.extend_from_slice(b"\r\n");
    }
    wire
}

fn text_gets(first: usize) -> Vec<u8> {
    (0..PIPELINE).flat_map(|i| format!("get key:{:05}\r\n", (first + i * 7) % KEYS).into_bytes()).collect()
}

fn binary_packet(opcode: u8, key: &[u8], extras: &[u8], value: &[u8]) -> Vec<u8> {
    let body = (extras.len() + key.len() + value.len()) as u32;
    let mut p = vec![0x80, opcode];
    p.extend_from_slice(&(key.len() as u16).to_be_bytes());
    p.extend_from_slice(&[extras.len() as u8, 0, 0, 0]);
    p.extend_from_slice(&body.to_be_bytes());
    p.extend_from_slice(&[0; 12]);
    p.extend_from_slice(extras);
    p.extend_from_slice(key);
    p.extend_from_slice(value);
    p
}

fn binary_gets(first: usize) -> Vec<u8> {
    (0..PIPELINE).flat_map(|i| binary_packet(0x00, format!("key:{:05}", (first + i * 7) % KEYS).as_bytes(), &[], &[])).collect()
}

fn bench(c: &mut Criterion) {
    let mut shard = shard();
    let mut out = Vec::with_capacity(64 * 1024);
    for first in (0..KEYS).step_by(PIPELINE) {
        run::<TextCodec>(&mut shard, &text_sets(first), &mut out);
        out.clear();
    }
    let mut group = c.benchmark_group("one shard, 16 pipelined requests");
    group.throughput(Throughput::Elements(PIPELINE as u64));
    let gets: Vec<Vec<u8>> = (0..64).map(|b| text_gets(b * 131)).collect();
    let sets: Vec<Vec<u8>> = (0..64).map(|b| text_sets(b * 131)).collect();
    let bin_gets: Vec<Vec<u8>> = (0..64).map(|b| binary_gets(b * 131)).collect();
    let mut round = 0;
    group.bench_function("text get 32 B hit", |b| {
        b.iter_batched_ref(
            || {
                round += 1;
                &gets[round % gets.len()]
            },
            |input| {
                out.clear();
                run::<TextCodec>(&mut shard, black_box(input), &mut out);
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("text set 32 B", |b| {
        b.iter_batched_ref(
            || {
                round += 1;
                &sets[round % sets.len()]
            },
            |input| {
                out.clear();
                run::<TextCodec>(&mut shard, black_box(input), &mut out);
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("binary get 32 B hit", |b| {
        b.iter_batched_ref(
            || {
                round += 1;
                &bin_gets[round % bin_gets.len()]
            },
            |input| {
                out.clear();
                run::<BinaryCodec>(&mut shard, black_box(input), &mut out);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
