//! The pieces together, as the wiring step will use them: a standby reconnects, the handshake asks the
//! shard logs' backlogs whether it can resume, and the active ships only what the standby lacks, over the
//! in-memory link, in frames the standby decodes and acknowledges.

use replica::frame::{begin_frame, finish_frame, FrameDecoder};
use replica::handshake::{
    ActiveConfig, ActiveHandshake, Nonce, Outcome, ShardStart, StandbyConfig, StandbyHandshake,
};
use replica::log::{channel, Drained, LogConfig, LogConsumer};
use replica::transport::memory::{pair, MemoryConfig};
use replica::transport::{Ack, ActiveLink, StandbyLink};
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

    // Ship the resumed shard: only 13..=20 cross the link.
    let (mut active_link, mut standby_link) = pair(MemoryConfig { max_piece: 5, corrupt_at: None });
    let consumer = &mut consumers[0];
    let mut frame = Vec::new();
    loop {
        frame.clear();
        let start = begin_frame(&mut frame);
        match consumer.drain_batch(100, &mut frame) {
            Drained::Batch { first_seq, count, .. } => {
                finish_frame(&mut frame, start, consumer.shard(), first_seq, count).unwrap();
                active_link.send_batch(&frame).unwrap();
            }
            Drained::Empty => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut decoder = FrameDecoder::default();
    standby_link.poll_batches(&mut decoder).unwrap();
    let mut applied = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        applied.extend(frame.records().map(|logged| logged.seq.0));
        standby_link.send_ack(Ack { shard: frame.header.shard, seq: frame.header.last_seq() }).unwrap();
    }
    assert_eq!(applied, (13..=20).collect::<Vec<u64>>());
    let mut acks = Vec::new();
    active_link.poll_acks(&mut acks).unwrap();
    assert_eq!(acks.last(), Some(&Ack { shard: ShardId(0), seq: LogSeq(20) }));
}
