//! `tandem-bench` as its users run it: every subcommand against a real tandemd (and memcached for
//! `compare`), checking exit status and the `--json` report, plus a lying server that `setget` must catch.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tandem_tests::{tandemd_path, ServerProcess};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem-bench")).args(args).output().expect("run tandem-bench")
}

/// Runs tandem-bench with `--json`, asserts it exited 0 and returns the parsed report.
fn bench_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = bench(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tandem-bench {args:?}: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("tandem-bench {args:?} printed no JSON ({e}):\n{stdout}"))
}

#[test]
fn setget_sizes_and_blast_against_tandemd() {
    let server = ServerProcess::tandemd(&["-t", "2", "-m", "64"]);
    let addr = format!("127.0.0.1:{}", server.port);
    for protocol in ["text", "meta", "binary"] {
        let report = bench_json(&["setget", "--server", &addr, "--protocol", protocol, "--keys", "300"]);
        assert_eq!(report["errors"], 0, "{report}");
        assert!(report["bytes"].as_u64().unwrap() > 0, "{report}");
    }

    let sizes = bench_json(&["sizes", "--server", &addr]);
    let limit = sizes["item_size_max"].as_u64().unwrap();
    assert!(limit >= 1024 * 1024, "{sizes}");
    assert!(sizes["largest_ok"].as_u64().unwrap() + 1024 > limit, "{sizes}");
    assert_eq!(sizes["corrupt"], false, "{sizes}");

    for protocol in ["text", "binary"] {
        let blast = bench_json(&[
            "blast", "--server", &addr, "--protocol", protocol, "--requests", "2000", "--connections", "4", "--threads", "2",
            "--ratio", "set=1,get=10,touch=1,delete=1", "--value-size", "uniform:10-1000",
        ]);
        assert_eq!(blast["ops"], 2000, "{blast}");
        assert_eq!(blast["errors"], 0, "{blast}");
        assert!(blast["ops_per_sec"].as_f64().unwrap() > 0.0, "{blast}");
        let latency = &blast["latency"];
        let (p50, p99, max) = (latency["p50_us"].as_f64().unwrap(), latency["p99_us"].as_f64().unwrap(), latency["max_us"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{blast}");
        assert!(blast["server_usage"]["requests"].as_u64().unwrap() >= 2000, "{blast}");
    }
}

/// A server that stores nothing and answers every get with the same wrong 3 bytes.
fn lying_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let words: Vec<&str> = line.split_whitespace().collect();
            let reply = match words.as_slice() {
                ["set", _, _, _, size] => {
                    let mut data = vec![0; size.parse::<usize>().unwrap() + 2];
                    reader.read_exact(&mut data).unwrap();
                    "STORED\r\n".to_string()
                }
                ["get", key] => format!("VALUE {key} 0 3\r\nbad\r\nEND\r\n"),
                _ => "ERROR\r\n".to_string(),
            };
            if writer.write_all(reply.as_bytes()).is_err() {
                return;
            }
            line.clear();
        }
    });
    port
}

#[test]
fn setget_names_the_key_of_a_wrong_value_and_fails() {
    let port = lying_server();
    let addr = format!("127.0.0.1:{port}");
    let out = bench(&["setget", "--server", &addr, "--keys", "2", "--value-size", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("get k000000000000000: byte 0 is"), "{stdout}");
    assert!(stdout.contains("get k000000000000001:"), "{stdout}");
}

#[test]
fn compare_runs_memcached_and_tandemd_side_by_side() {
    let memcached = Path::new("/usr/bin/memcached");
    if !memcached.exists() {
        println!("SKIPPED compare_runs_memcached_and_tandemd_side_by_side: /usr/bin/memcached is not installed");
        return;
    }
    let tandemd = tandemd_path();
    let report = bench_json(&[
        "compare", "--tandemd", tandemd.to_str().unwrap(), "--rounds", "1", "--duration", "1", "--memory", "64",
        "--keys", "1000", "--connections", "4", "--warm-up", "1",
    ]);
    assert_eq!(report["errors"], 0, "{report}");
    // Both servers were warmed up, each for at most about the second asked (a pass is a second).
    let warm_ups = report["warm_ups"].as_array().unwrap();
    assert_eq!(warm_ups.len(), 2, "{report}");
    for warm in warm_ups {
        assert!(warm["sets"].as_u64().unwrap() > 0 && warm["seconds"].as_f64().unwrap() < 5.0, "{warm}");
    }
    assert_eq!(report["rounds"].as_array().unwrap().len(), 2, "{report}");
    for side in ["memcached", "tandemd", "ratio"] {
        for field in ["ops_per_sec", "p99_us", "cpu_us_per_request"] {
            let value = report[side][field].as_f64().unwrap_or(f64::NAN);
            assert!(value.is_finite() && value > 0.0, "{side}.{field} = {value}: {report}");
        }
    }
}
