#!/usr/bin/env bash
# How long tandemd (uring -t 1, -m 1024) keeps faulting in its arena under 4 KB sets: RSS after each 3 s of sets.
set -euo pipefail
work=$(mktemp -d)
printf '[net]\nbackend = "uring"\n' > $work/uring.toml
${TARGET:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}/tandemd --config $work/uring.toml -t 1 -m 1024 -p 21212 -l 127.0.0.1 2>/dev/null & t1=$!
memcached -u root -t 2 -m 1024 -p 21211 -l 127.0.0.1 -c 4096 & mc=$!
trap 'kill $t1 $mc 2>/dev/null; rm -rf $work' EXIT
sleep 1
b=${TARGET:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}/tandem-bench
for i in 1 2 3 4 5; do
  for p in 21211 21212; do
    ops=$($b blast --server 127.0.0.1:$p --ratio set=1 --value-size 4096 --keys 100000 --connections 50 --threads 2 --duration 3 --json | python3 -c "import json,sys;print(json.load(sys.stdin)['ops'])")
    pid=$([[ $p == 21211 ]] && echo $mc || echo $t1)
    echo "port $p pass $i sets $ops rss_mb $(( $(awk '/VmRSS/ {print $2}' /proc/$pid/status) / 1024 ))"
  done
done
