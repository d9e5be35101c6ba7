//! rdma-smoke: the ring protocol over real verbs between two hosts (two appliance guests with Soft-RoCE).
//!
//! ```text
//! rdma-smoke standby LISTEN_ADDR [--device rxe0] [--frames N]
//! rdma-smoke active STANDBY_ADDR [--device rxe0] [--frames N] [--wrong-rkey]
//! ```
//!
//! Each side opens the device (default: the first with an active port), picks the RoCE v2 IPv4 GID,
//! and makes an RC queue pair. Over a TCP side channel the standby offers its endpoint, its receive
//! ring (address, rkey, slot size and count) and a ring id; the active answers with its endpoint and
//! its credit region. Both connect (INIT -> RTR -> RTS by GID) and say "ready".
//!
//! The active then writes N batch frames (one SET record each, values of 40 to 9,000 bytes, so large
//! ones are split across slots) into the ring with RDMA WRITE, the last span of each push as
//! WRITE_WITH_IMM (the doorbell); unsignaled but every 16th. It stalls when the credits run out and
//! reads new ones from its credit region. The standby polls the ring, feeds the slots to a
//! FrameDecoder, checks every record (sequence, key, value), and writes its consumer position back
//! into the active's credit region. At the end the standby reports over TCP how many records it
//! applied and the active checks the number. `--wrong-rkey` makes the active write with a wrong rkey
//! and expects the completion to say "remote access error".
//!
//! Exit status 0 means every frame arrived intact and in order.

use std::io::{Read, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use replica::frame::{encode_frame, FrameDecoder};
use replica::ids::{LogSeq, ShardId};
use replica::rdma::verbs::{
    Access, Completion, CompletionQueue, Context, Endpoint, MemoryRegion, PortAddress, ProtectionDomain, QpConfig,
    QueuePair, RemoteRegion, VerbsError, Write,
};
use replica::record::Record;
use replica::ring::{RingError, RingLayout, RingMemory, RingReader, RingWriter, Polled, CREDIT_LEN};

const SLOT_SIZE: usize = 4096;
const SLOT_COUNT: usize = 16;
const SHARD: ShardId = ShardId(0);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rdma-smoke: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    role: String,
    addr: String,
    device: Option<String>,
    frames: u64,
    wrong_rkey: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let (Some(role), Some(addr)) = (args.first(), args.get(1)) else {
        return Err("usage: rdma-smoke standby|active ADDR [--device NAME] [--frames N] [--wrong-rkey]".into());
    };
    let mut options = Options { role: role.clone(), addr: addr.clone(), device: None, frames: 1000, wrong_rkey: false };
    let mut rest = args[2..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--device" => options.device = Some(rest.next().ok_or("--device needs a name")?.clone()),
            "--frames" => options.frames = rest.next().ok_or("--frames needs a number")?.parse()?,
            "--wrong-rkey" => options.wrong_rkey = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(options)
}

fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let side = Side::open(options.device.as_deref())?;
    println!(
        "{}: device {}, port {}, GID index {} ({}), qp {}",
        options.role,
        side.context.name(),
        side.local.port,
        side.local.gid_index,
        side.gid_ip,
        side.qp.qp_num()
    );
    match options.role.as_str() {
        "standby" => standby(side, &options),
        "active" => active(side, &options),
        other => Err(format!("unknown role {other}").into()),
    }
}

/// One end's verbs objects.
struct Side {
    context: Context,
    pd: ProtectionDomain,
    cq: CompletionQueue,
    qp: QueuePair,
    local: PortAddress,
    endpoint: Endpoint,
    gid_ip: String,
}

impl Side {
    fn open(device: Option<&str>) -> std::result::Result<Side, VerbsError> {
        let context = Context::open(device)?;
        let port = context.first_active_port()?;
        let info = context.query_port(port)?;
        let gid = context.roce_v2_ipv4_gid(port)?;
        let pd = ProtectionDomain::new(&context)?;
        let cq = CompletionQueue::new(&context, 512)?;
        let qp = QueuePair::new_rc(&pd, &cq, &cq, QpConfig { max_send_wr: 128, max_recv_wr: 64, signal_every: 16 })?;
        let psn = (std::process::id() ^ 0x5a5a) & 0xff_ffff;
        let endpoint = Endpoint { qp_num: qp.qp_num(), psn, gid: gid.gid, lid: info.lid };
        let local = PortAddress { port, gid_index: gid.index as u8, mtu: info.active_mtu };
        let gid_ip = gid.ipv4().map(|ip| ip.to_string()).unwrap_or_default();
        Ok(Side { context, pd, cq, qp, local, endpoint, gid_ip })
    }

    /// Polls completions until `wanted` returns true for one, failing on any error completion.
    fn poll_until(&mut self, timeout: Duration, mut wanted: impl FnMut(&Completion) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut completions = Vec::new();
        loop {
            completions.clear();
            self.cq.poll(&mut completions)?;
            let mut found = false;
            for completion in &completions {
                completion.check()?;
                if !completion.is_write_with_imm_received() {
                    self.qp.retire(completion);
                }
                found |= wanted(completion);
            }
            if found {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("timed out waiting for a completion".into());
            }
        }
    }
}

/// The value of record `seq`: 40 to 9,000 bytes, derived from the sequence so the standby can check it.
fn value_of(seq: u64) -> Vec<u8> {
    let len = 40 + (seq * 7919 % 8961) as usize;
    (0..len).map(|index| (seq as usize + index) as u8).collect()
}

fn frame_of(seq: u64, out: &mut Vec<u8>) {
    let key = format!("smoke:{seq}");
    let value = value_of(seq);
    let mut records = Vec::new();
    Record::Set { key: key.as_bytes(), flags: 0, expiry: 0, cas: seq, value: &value }
        .encode(SHARD, LogSeq(seq), &mut records)
        .expect("a small record");
    out.clear();
    encode_frame(SHARD, LogSeq(seq), 1, &records, out).expect("a small frame");
}

fn read_exact<const N: usize>(stream: &mut TcpStream) -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn standby(mut side: Side, options: &Options) -> Result<()> {
    let layout = RingLayout::new(SLOT_SIZE, SLOT_COUNT)?;
    let ring = MemoryRegion::new(&side.pd, layout.region_len(), Access::RemoteWrite)?;
    let credit_out = MemoryRegion::new(&side.pd, 4096, Access::LocalOnly)?;
    let ring_id = u64::from(std::process::id()) << 32 | 0x7461_6e64;

    let listener = TcpListener::bind(&options.addr)?;
    println!("standby: waiting on {}", options.addr);
    let (mut stream, peer) = listener.accept()?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut offer = Vec::new();
    offer.extend_from_slice(&side.endpoint.encode());
    offer.extend_from_slice(&ring.remote().encode());
    offer.extend_from_slice(&(SLOT_SIZE as u32).to_le_bytes());
    offer.extend_from_slice(&(SLOT_COUNT as u32).to_le_bytes());
    offer.extend_from_slice(&ring_id.to_le_bytes());
    stream.write_all(&offer)?;
    let remote = Endpoint::decode(&read_exact::<{ Endpoint::LEN }>(&mut stream)?);
    let credit_region = RemoteRegion::decode(&read_exact::<{ RemoteRegion::LEN }>(&mut stream)?);
    side.qp.connect(side.local, side.endpoint.psn, &remote)?;
    // Receives for the doorbells (a queue pair takes them from INIT on, not in RESET).
    for wr_id in 0..64 {
        side.qp.post_recv(wr_id)?;
    }
    stream.write_all(b"R")?;
    read_exact::<1>(&mut stream)?;
    println!("standby: connected to {peer} (qp {}), ring of {SLOT_COUNT} x {SLOT_SIZE} bytes", remote.qp_num);

    let mut reader = RingReader::new(layout, ring_id);
    let mut decoder = FrameDecoder::default();
    let mut next_seq = 1u64;
    let mut credit_writes = 0u64;
    let mut doorbells = 0u64;
    let mut completions = Vec::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    while next_seq <= options.frames {
        completions.clear();
        side.cq.poll(&mut completions)?;
        for completion in &completions {
            completion.check()?;
            if completion.is_write_with_imm_received() {
                reader.note_imm(completion.imm.unwrap_or(0));
                doorbells += 1;
                side.qp.post_recv(completion.wr_id)?;
            } else {
                side.qp.retire(completion);
            }
        }
        // Empty or Incomplete: nothing more this round.
        while let Polled::Ready { payload, .. } = reader.poll(&ring)? {
            decoder.feed(payload);
        }
        while let Some(frame) = decoder.next_frame()? {
            for logged in frame.records() {
                let Record::Set { key, value, .. } = logged.record else {
                    return Err(format!("{}: not a SET", logged.seq).into());
                };
                let expected_key = format!("smoke:{next_seq}");
                if logged.seq != LogSeq(next_seq) || key != expected_key.as_bytes() || value != value_of(next_seq) {
                    return Err(format!("record {} is not what was sent (expected seq {next_seq})", logged.seq).into());
                }
                next_seq += 1;
                last_progress = Instant::now();
            }
        }
        if let Some(record) = reader.credit() {
            if side.qp.send_room() == 0 {
                side.poll_until(Duration::from_secs(10), |_| true)?;
            }
            credit_out.write_at(credit_writes as usize % 256 * CREDIT_LEN, &record);
            side.qp.post_write(&Write {
                wr_id: 1 << 32 | credit_writes,
                local: &credit_out,
                local_offset: credit_writes as usize % 256 * CREDIT_LEN,
                len: CREDIT_LEN,
                remote_addr: credit_region.addr,
                rkey: credit_region.rkey,
                imm: None,
                signal: false,
            })?;
            credit_writes += 1;
        }
        if last_progress.elapsed() > Duration::from_secs(60) {
            return Err(format!("no progress for 60 s at record {next_seq} ({} incomplete polls)", reader.incomplete_polls()).into());
        }
    }
    let applied = next_seq - 1;
    println!(
        "standby: {applied} records applied in order and intact in {:.2} s; {doorbells} doorbells, {credit_writes} credit writes, {} incomplete polls",
        started.elapsed().as_secs_f64(),
        reader.incomplete_polls()
    );
    stream.write_all(&applied.to_le_bytes())?;
    Ok(())
}

fn active(mut side: Side, options: &Options) -> Result<()> {
    // The standby may still be starting: try for a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        match TcpStream::connect(&options.addr) {
            Ok(stream) => break stream,
            Err(error) if Instant::now() < deadline => {
                eprintln!("active: {} not answering yet ({error})", options.addr);
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => return Err(error.into()),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let remote = Endpoint::decode(&read_exact::<{ Endpoint::LEN }>(&mut stream)?);
    let ring_region = RemoteRegion::decode(&read_exact::<{ RemoteRegion::LEN }>(&mut stream)?);
    let slot_size = u32::from_le_bytes(read_exact::<4>(&mut stream)?) as usize;
    let slot_count = u32::from_le_bytes(read_exact::<4>(&mut stream)?) as usize;
    let ring_id = u64::from_le_bytes(read_exact::<8>(&mut stream)?);
    let layout = RingLayout::new(slot_size, slot_count)?;
    if ring_region.len < layout.region_len() as u64 {
        return Err("the offered ring region is smaller than its layout".into());
    }
    let credits = MemoryRegion::new(&side.pd, 4096, Access::RemoteWrite)?;
    let staging = MemoryRegion::new(&side.pd, layout.region_len(), Access::LocalOnly)?;
    stream.write_all(&side.endpoint.encode())?;
    stream.write_all(&credits.remote().encode())?;
    side.qp.connect(side.local, side.endpoint.psn, &remote)?;
    read_exact::<1>(&mut stream)?;
    stream.write_all(b"R")?;
    println!("active: connected (remote qp {}), ring of {slot_count} x {slot_size} bytes", remote.qp_num);

    if options.wrong_rkey {
        return wrong_rkey(&mut side, &staging, ring_region);
    }

    let mut writer = RingWriter::new(layout, ring_id);
    let mut mirror = vec![0u8; layout.region_len()];
    let mut frame = Vec::new();
    let mut writes = 0u64;
    let started = Instant::now();
    for seq in 1..=options.frames {
        frame_of(seq, &mut frame);
        let pushed = loop {
            match writer.push(&frame, &mut mirror) {
                Ok(pushed) => break pushed,
                Err(RingError::Full { .. }) => {
                    let mut record = [0u8; CREDIT_LEN];
                    credits.read(0, &mut record);
                    if !writer.take_credit(&record)? {
                        // Completions of our own writes, while we wait for the standby.
                        let mut completions = Vec::new();
                        side.cq.poll(&mut completions)?;
                        for completion in &completions {
                            completion.check()?;
                            side.qp.retire(completion);
                        }
                    }
                }
                Err(error) => return Err(error.into()),
            }
        };
        let spans = pushed.spans();
        while side.qp.send_room() < spans.len() as u32 {
            side.poll_until(Duration::from_secs(10), |_| true)?;
        }
        for (index, span) in spans.iter().enumerate() {
            staging.write_at(span.start, &mirror[span.clone()]);
            let last = index + 1 == spans.len();
            side.qp.post_write(&Write {
                wr_id: writes,
                local: &staging,
                local_offset: span.start,
                len: span.len(),
                remote_addr: ring_region.addr + span.start as u64,
                rkey: ring_region.rkey,
                imm: last.then(|| pushed.imm()),
                signal: false,
            })?;
            writes += 1;
        }
    }
    let elapsed = started.elapsed();
    let applied = u64::from_le_bytes(read_exact::<8>(&mut stream)?);
    println!(
        "active: {} frames in {writes} writes ({} credit stalls) in {:.2} s; the standby applied {applied}",
        options.frames,
        writer.stalls(),
        elapsed.as_secs_f64()
    );
    if applied != options.frames {
        return Err(format!("the standby applied {applied} of {} records", options.frames).into());
    }
    Ok(())
}

/// A write with a wrong rkey must fail with a completion that says so.
fn wrong_rkey(side: &mut Side, staging: &MemoryRegion, ring: RemoteRegion) -> Result<()> {
    side.qp.post_write(&Write {
        wr_id: 99,
        local: staging,
        local_offset: 0,
        len: 64,
        remote_addr: ring.addr,
        rkey: ring.rkey ^ 0x5a5a,
        imm: None,
        signal: true,
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut completions = Vec::new();
    while completions.is_empty() {
        side.cq.poll(&mut completions)?;
        if Instant::now() > deadline {
            return Err("no completion for the wrong-rkey write".into());
        }
    }
    match completions[0].check() {
        Err(error @ VerbsError::Completion { .. }) if error.to_string().contains("remote access error") => {
            println!("active: wrong rkey refused as expected: {error}");
            Ok(())
        }
        other => Err(format!("a wrong rkey gave {other:?}").into()),
    }
}
