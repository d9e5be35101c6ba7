//! The pieces together, as the wiring step will use them: a standby reconnects, the handshake asks the
//! shard logs' backlogs whether it can resume, and the active ships only what the standby lacks, over the
//! in-memory link, in wire messages the standby reads back in order.

use replica::frame::{begin_frame, finish_frame};
use replica::handshake::{
    ActiveConfig, ActiveHandshake, Nonce, Outcome, ShardStart, StandbyConfig, StandbyHandshake,
};
use replica::log::{channel, Drained, LogConfig, LogConsumer};
use replica::transport::memory::{pair, MemoryConfig};
use replica::transport::{StreamSink, StreamSource};
use replica::wire::{self, Kind, Message, MessageReader};
use replica::{Epoch, LogSeq, Record, ReplicationId, ShardId};

const SECRET: &[u8] = b"shared by the pair";

#[test]
fn a_reconnecting_standby_resumes_one_shard_and_full_syncs_the_other() {
    let history = ReplicationId::random();
    // Two shards: 20 records each; shard 1 keeps almost no backlog.
    let mut consumers: Vec<LogConsumer> = (0..2u16)
        .map(|shard| {
            let backlog_bytes = if shard == 0 { 1 << 20 } else { 0 };
            let config = LogConfig { chunk_bytes: 128, backlog_bytes, ..LogConfig::default() };
            let (mut producer, mut consumer) = channel(ShardId(shard), LogSeq::ZERO, config);
            for number in 1..=20u32 {
                let key = format!("s{shard}-k{number}");
                let record = Record::Set { key: key.as_bytes(), flags: number, expiry: 0, cas: 1, value: b"v" };
                producer.append(&record).unwrap();
            }
            producer.flush();
            // Shipped once already, before the standby went away.
            while consumer.drain_batch(1 << 20, &mut Vec::new()) != Drained::Empty {}
            consumer
        })
        .collect();

    // The standby applied 12 records of each shard before the link dropped.
    let standby_config = StandbyConfig {
        secret: SECRET.to_vec(),
        shard_count: 2,
        history: Some(history),
        epoch: Epoch(1),
        applied: vec![LogSeq(12), LogSeq(12)],
    };
    let active_config = ActiveConfig {
        secret: SECRET.to_vec(),
        shard_count: 2,
        history,
        epoch: Epoch(1),
        previous: None,
        newest: vec![LogSeq(20), LogSeq(20)],
    };
    let (mut standby, hello) = StandbyHandshake::start(standby_config, Nonce::random());
    let mut active = ActiveHandshake::new(active_config, Nonce::random());
    let mut can_resume = |shard: ShardId, after: LogSeq| consumers[shard.index()].resume_from(after).is_ok();

    let mut to_active = vec![hello];
    let (mut active_outcome, mut standby_outcome) = (None, None);
    while let Some(message) = to_active.pop() {
        let step = active.on_message(message, &mut can_resume);
        active_outcome = active_outcome.or(step.outcome);
        for reply in step.send {
            let step = standby.on_message(reply);
            standby_outcome = standby_outcome.or(step.outcome);
            to_active.extend(step.send);
        }
    }
    let plan = vec![ShardStart::Resume { after: LogSeq(12) }, ShardStart::FullSync];
    let expected = Outcome::Accepted { history, epoch: Epoch(1), plan };
    assert_eq!(active_outcome.as_ref(), Some(&expected));
    assert_eq!(standby_outcome.as_ref(), Some(&expected));

    // Ship the resumed shard: only 13..=20 cross the link, as Batch messages of the data stream.
    let (mut sink, mut source) = pair(MemoryConfig { max_piece: 5, ..MemoryConfig::default() });
    let consumer = &mut consumers[0];
    loop {
        let out = sink.queue();
        let message = wire::begin(Kind::Batch, out);
        let start = begin_frame(out);
        match consumer.drain_batch(100, out) {
            Drained::Batch { first_seq, count, .. } => {
                finish_frame(out, start, consumer.shard(), first_seq, count).unwrap();
                wire::finish(out, message);
            }
            Drained::Empty => {
                out.truncate(message);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    sink.pump().unwrap();
    let mut reader = MessageReader::new(1 << 20);
    source.receive(&mut reader, usize::MAX).unwrap();
    let mut applied = Vec::new();
    while let Some(message) = reader.next_message().unwrap() {
        let Message::Batch(frame) = message else { panic!("only batches were sent") };
        assert_eq!(frame.header.shard, ShardId(0));
        applied.extend(frame.records().map(|logged| logged.seq.0));
    }
    assert_eq!(applied, (13..=20).collect::<Vec<u64>>());
}
