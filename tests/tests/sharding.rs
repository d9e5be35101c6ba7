//! The runtime's promises, checked on a real tandemd with more shards than this machine has cores:
//! keys spread over every shard, and each connection gets its replies in request order even when
//! consecutive requests run on different cores.

use tandem_tests::ServerProcess;

#[test]
fn pipelined_requests_across_shards_reply_in_order() {
    let server = ServerProcess::tandemd(&["-t", "4"]);
    let mut c = server.connect();
    let keys: Vec<String> = (0..200).map(|i| format!("order:{i}")).collect();
    let mut batch = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let value = format!("v{i}");
        batch.extend_from_slice(format!("set {key} {i} 0 {}\r\n{value}\r\n", value.len()).as_bytes());
        batch.extend_from_slice(format!("get {key}\r\n").as_bytes());
    }
    c.send(&batch);
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(c.line(), "STORED\r\n", "set #{i}");
        let value = format!("v{i}");
        assert_eq!(c.line(), format!("VALUE {key} {i} {}\r\n", value.len()), "get #{i}");
        assert_eq!(c.line(), format!("{value}\r\n"));
        assert_eq!(c.line(), "END\r\n");
    }
    assert!(c.stat("cross_shard_requests").parse::<u64>().unwrap() > 0, "some keys must live on other shards");
}

#[test]
fn multi_get_across_shards_keeps_key_order() {
    let server = ServerProcess::tandemd(&["-t", "4"]);
    let mut c = server.connect();
    let keys: Vec<String> = (0..64).map(|i| format!("mget:{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        if i % 3 != 0 {
            assert_eq!(c.call(&format!("set {key} 0 0 {}\r\n{key}\r\n", key.len())), "STORED\r\n");
        }
    }
    c.send(format!("get {}\r\n", keys.join(" ")).as_bytes());
    for (i, key) in keys.iter().enumerate() {
        if i % 3 == 0 {
            continue;
        }
        assert_eq!(c.line(), format!("VALUE {key} 0 {}\r\n", key.len()));
        assert_eq!(c.line(), format!("{key}\r\n"));
    }
    assert_eq!(c.line(), "END\r\n");
}

#[test]
fn every_shard_holds_items_and_flush_all_reaches_all_of_them() {
    let server = ServerProcess::tandemd(&["-t", "4"]);
    let mut c = server.connect();
    for i in 0..400 {
        assert_eq!(c.call(&format!("set spread:{i} 0 0 1 noreply\r\nx\r\nmn\r\n")), "MN\r\n");
    }
    let items = c.stats("items");
    let shards_with_items = items.iter().filter(|(n, v)| n.ends_with(":number") && v != "0").count();
    assert_eq!(shards_with_items, 4, "{items:?}");
    assert_eq!(c.call("flush_all\r\n"), "OK\r\n");
    for i in 0..400 {
        assert_eq!(c.call(&format!("get spread:{i}\r\n")), "END\r\n", "spread:{i} survived flush_all");
    }
}

#[test]
fn binary_requests_across_shards_reply_in_order() {
    let server = ServerProcess::tandemd(&["-t", "4"]);
    let mut c = server.connect();
    let mut batch = Vec::new();
    for i in 0u32..100 {
        let key = format!("bin:{i}");
        let value = i.to_be_bytes();
        // SET with opaque i: header, extras (flags, expiry), key, value.
        batch.extend_from_slice(&binary_request(0x01, key.as_bytes(), &[0u8; 8], &value, i));
        // GETK with opaque 1000 + i.
        batch.extend_from_slice(&binary_request(0x0c, key.as_bytes(), &[], &[], 1000 + i));
    }
    c.send(&batch);
    for i in 0u32..100 {
        let set = read_binary_response(&mut c);
        assert_eq!((set.opcode, set.status, set.opaque), (0x01, 0, i));
        let get = read_binary_response(&mut c);
        assert_eq!((get.opcode, get.status, get.opaque), (0x0c, 0, 1000 + i));
        assert_eq!(get.key, format!("bin:{i}").into_bytes());
        assert_eq!(get.value, i.to_be_bytes());
    }
}

fn binary_request(opcode: u8, key: &[u8], extras: &[u8], value: &[u8], opaque: u32) -> Vec<u8> {
    let body = extras.len() + key.len() + value.len();
    let mut p = vec![0x80, opcode];
    p.extend_from_slice(&(key.len() as u16).to_be_bytes());
    p.push(extras.len() as u8);
    p.push(0);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&(body as u32).to_be_bytes());
    p.extend_from_slice(&opaque.to_be_bytes());
    p.extend_from_slice(&[0; 8]);
    p.extend_from_slice(extras);
    p.extend_from_slice(key);
    p.extend_from_slice(value);
    p
}

struct BinaryResponse {
    opcode: u8,
    status: u16,
    opaque: u32,
    key: Vec<u8>,
    value: Vec<u8>,
}

fn read_binary_response(c: &mut tandem_tests::Client) -> BinaryResponse {
    let h = c.exact(24);
    assert_eq!(h[0], 0x81, "response magic");
    let key_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    let extras = h[4] as usize;
    let status = u16::from_be_bytes([h[6], h[7]]);
    let body = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
    let opaque = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let b = c.exact(body);
    BinaryResponse { opcode: h[1], status, opaque, key: b[extras..extras + key_len].to_vec(), value: b[extras + key_len..].to_vec() }
}
