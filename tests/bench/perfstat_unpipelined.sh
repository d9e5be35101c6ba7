#!/usr/bin/env bash
# Side by side: memcached -t 2 and tandemd (uring -t 1, uring -t 2) up at once, each prefilled, then
# ROUNDS rounds of the same blast against each in turn with `perf stat` on the server; prints ops/s,
# server CPUs busy, server us/req, and the client's us/req (tandem-bench's own rusage).
# Usage: tests/bench/perfstat_unpipelined.sh VALUE_SIZE RATIO [ROUNDS] [DURATION_S]
set -euo pipefail
size=${1:-4096}; ratio=${2:-set=1,get=1}; rounds=${3:-3}; dur=${4:-4}
bench=${TARGET:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}/tandem-bench
tandemd=${TARGET:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}/tandemd
work=$(mktemp -d)
printf '[net]\nbackend = "uring"\n' > $work/uring.toml
memcached -u root -t 2 -m 1024 -p 21211 -l 127.0.0.1 -c 4096 & mc=$!
$tandemd --config $work/uring.toml -t 1 -m 1024 -p 21212 -l 127.0.0.1 2>/dev/null & t1=$!
$tandemd --config $work/uring.toml -t 2 -m 1024 -p 21213 -l 127.0.0.1 2>/dev/null & t2=$!
trap 'kill $mc $t1 $t2 2>/dev/null; rm -rf $work' EXIT
sleep 1
for port in 21211 21212 21213; do
  $bench blast --server 127.0.0.1:$port --ratio set=1 --value-size $size --keys 100000 --connections 50 --threads 2 --duration 3 --json > /dev/null
done
echo "size=$size ratio=$ratio rounds=$rounds duration=${dur}s  $(date -u +%H:%M:%S) load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-6s %-22s %10s %6s %8s %9s\n' round server ops/s cpus us/req client
for r in $(seq 1 $rounds); do
  for entry in "21211 memcached-t2 $mc" "21212 tandemd-uring-t1 $t1" "21213 tandemd-uring-t2 $t2"; do
    set -- $entry
    perf stat -x, -e task-clock -p $3 -o $work/ps.txt -- sleep $((dur+1)) &
    ps=$!
    $bench blast --server 127.0.0.1:$1 --ratio $ratio --value-size $size --keys 100000 --key-length 16 --connections 50 --threads 2 --pipeline 1 --duration $dur --json > $work/out.json
    wait $ps
    ops=$(python3 -c "import json;d=json.load(open('$work/out.json'));print(int(d['ops_per_sec']) if 'ops_per_sec' in d else d)")
    req=$(python3 -c "import json;d=json.load(open('$work/out.json'));print(d.get('requests', d.get('ops', 0)))")
    ms=$(awk -F, '/task-clock/ {print $1}' $work/ps.txt)
    cl=$(python3 -c "import json;d=json.load(open('$work/out.json'));print(d['client_cpu_us_per_request']*d['ops'])")
    python3 - "$r" "$2" "$ops" "$req" "$ms" "$cl" "$((dur+1))" <<'PY'
import sys
r, name, ops, req, ms, cl, win = sys.argv[1:]
ops, req, ms, cl, win = int(ops), int(req), float(ms), float(cl), float(win)
print(f"{r:<6} {name:<22} {ops:>10} {ms/1000/win:>6.2f} {ms*1000/req:>8.2f} {cl/req:>9.2f}")
PY
  done
done
