#!/usr/bin/env bash
# perf record of tandemd uring -t 1 under the 4 KB 1:1 unpipelined blast, after 6 s of 4 KB sets (its
# arena written over), 4 s; the data goes to $PERF_DATA (default ./perf4k.data). Needs perf.
set -euo pipefail
work=$(mktemp -d)
printf '[net]\nbackend = "uring"\n' > $work/uring.toml
${TARGET:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}/tandemd --config $work/uring.toml -t 1 -m 1024 -p 21212 -l 127.0.0.1 2>/dev/null & t1=$!
trap 'kill $t1 2>/dev/null; rm -rf $work' EXIT
sleep 1
b=${TARGET:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}/tandem-bench
$b blast --server 127.0.0.1:21212 --ratio set=1 --value-size 4096 --keys 100000 --connections 50 --threads 2 --pipeline 4 --duration 6 > /dev/null
perf record -F 2000 -g -p $t1 -o ${PERF_DATA:-perf4k.data} -- sleep 4 2>/dev/null &
$b blast --server 127.0.0.1:21212 --ratio set=1,get=1 --value-size 4096 --keys 100000 --key-length 16 --connections 50 --threads 2 --duration 4 > /dev/null
wait
