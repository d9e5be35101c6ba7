#!/usr/bin/env bash
# tandemd on its userspace stack over DPDK's net_af_xdp on a veth, next to tandemd on kernel sockets
# reached over a veth, in the same run: the same client namespace, the same tandem-bench blast, A B A B.
#
#   client namespace tdb-client
#     ethx 10.201.1.1 <-veth-> tdbx0 (root namespace): tandemd -t 1, [net] backend = "dpdk", net_af_xdp
#     ethk 10.201.2.1 <-veth-> ethk 10.201.2.2 (namespace tdb-kernel): tandemd -t 1, kernel sockets
#
# Both client ends get the same settings (checksum and segmentation offload off, which the af_xdp path
# needs: FIELD-NOTES). Both servers run throughout, one worker each; the idle one sleeps (the userspace
# worker spins only while it has traffic). A veth is not a NIC: this compares the two paths through
# this kernel's virtual device, on a 2-core machine shared by client and server.
#
# Needs root. Usage: tests/bench/af_xdp_vs_kernel.sh [rounds (3)] [seconds per blast (10)]
# Binaries: TANDEM_SERVER (default $CARGO_TARGET_DIR/release/tandemd), TANDEM_DPDK_SERVER (default
# $CARGO_TARGET_DIR/dpdk/release/tandemd), tandem-bench next to TANDEM_SERVER.
set -euo pipefail
rounds=${1:-3}
seconds=${2:-10}
target=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}
kernel_tandemd=${TANDEM_SERVER:-$target/release/tandemd}
dpdk_tandemd=${TANDEM_DPDK_SERVER:-$target/dpdk/release/tandemd}
bench=$(dirname "$kernel_tandemd")/tandem-bench
client=tdb-client
kernns=tdb-kernel
port=11311
xdp_ip=10.201.1.2
kernel_ip=10.201.2.2
work=$(mktemp -d /tmp/tandem-afxdp-bench.XXXXXX)
pids=()

for binary in "$kernel_tandemd" "$dpdk_tandemd" "$bench"; do
  [[ -x $binary ]] || { echo "missing $binary (cargo build --release -p dataplane -p tandem-tests; the dpdk one with --features dpdk --target-dir \$CARGO_TARGET_DIR/dpdk)"; exit 1; }
done
((EUID == 0)) || { echo "needs root (namespaces, veths, DPDK)"; exit 1; }

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$client" 2>/dev/null || true
  ip netns del "$kernns" 2>/dev/null || true
  ip link del tdbx0 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$client"
ip netns add "$kernns"
ip -n "$client" link set lo up
ip -n "$kernns" link set lo up
ip link add tdbx0 type veth peer name ethx netns "$client"
ip -n "$client" link add ethk type veth peer name ethk netns "$kernns"
sysctl -qw net.ipv6.conf.tdbx0.disable_ipv6=1
ip link set tdbx0 up
ip -n "$client" addr add 10.201.1.1/24 dev ethx
ip -n "$client" addr add 10.201.2.1/24 dev ethk
ip -n "$kernns" addr add $kernel_ip/24 dev ethk
for dev in ethx ethk; do
  ip -n "$client" link set $dev up
  ip netns exec "$client" ethtool -K $dev tx off tso off gso off >/dev/null
done
ip -n "$kernns" link set ethk up

if (($(cat /proc/sys/vm/nr_hugepages) < 256)); then echo 256 > /proc/sys/vm/nr_hugepages; fi
grep -q hugetlbfs /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages; }
cat > "$work/xdp.toml" <<TOML
[net]
backend = "dpdk"
[net.dpdk]
eal_args = ["--no-pci", "--in-memory", "--no-telemetry", "--file-prefix=tdbx", "--vdev=net_af_xdp0,iface=tdbx0,start_queue=0,queue_count=1"]
address = "$xdp_ip/24"
TOML

"$dpdk_tandemd" -p $port -t 1 -m 1024 -c 4096 --config "$work/xdp.toml" >"$work/xdp.log" 2>&1 &
pids+=($!)
ip netns exec "$kernns" "$kernel_tandemd" -p $port -l $kernel_ip -t 1 -m 1024 -c 4096 >"$work/kernel.log" 2>&1 &
pids+=($!)

in_client() { timeout 120 ip netns exec "$client" "$@"; }
for ip in $xdp_ip $kernel_ip; do
  for _ in $(seq 100); do
    if in_client timeout 2 bash -c "exec 3<>/dev/tcp/$ip/$port && echo version >&3 && head -c 7 <&3" 2>/dev/null | grep -q VERSION; then
      continue 2
    fi
    sleep 0.2
  done
  echo "tandemd on $ip does not answer"; tail -n 20 "$work"/*.log; exit 1
done
# Every key present, every byte checked (32-byte values, as the blast sets).
for ip in $xdp_ip $kernel_ip; do
  in_client "$bench" setget --server $ip:$port --keys 10000 --value-size 32 >/dev/null
done

echo "af_xdp vs kernel, $(date -u +%FT%TZ), $(uname -r), $rounds rounds of ${seconds}s; logs in $work"
results=$work/results.jsonl
for pipeline in 1 16; do
  for round in $(seq "$rounds"); do
    for backend in af_xdp kernel; do
      ip=$([[ $backend == af_xdp ]] && echo $xdp_ip || echo $kernel_ip)
      in_client "$bench" blast --server $ip:$port --protocol text --ratio set=1,get=10 --keys 10000 \
        --key-length 16 --value-size 32 --connections 50 --threads 1 --pipeline $pipeline \
        --duration "${seconds}s" --json >"$work/blast.json"
      python3 - "$work/blast.json" "$backend" "$pipeline" "$round" >>"$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"backend": sys.argv[2], "pipeline": int(sys.argv[3]), "round": int(sys.argv[4]),
                  "ops_per_sec": r["ops_per_sec"], "p99_us": r["latency"]["p99_us"], "errors": r["errors"]}))
PY
      tail -n 1 "$results"
    done
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("\n| pipeline | af_xdp ops/s (median) | kernel ops/s (median) | ratio af_xdp / kernel | p99 af_xdp / kernel | errors |")
print("| ---: | ---: | ---: | ---: | --- | ---: |")
for pipeline in sorted({r["pipeline"] for r in rows}):
    med = {}
    for backend in ("af_xdp", "kernel"):
        mine = [r for r in rows if r["pipeline"] == pipeline and r["backend"] == backend]
        med[backend] = (statistics.median(r["ops_per_sec"] for r in mine), statistics.median(r["p99_us"] for r in mine), sum(r["errors"] for r in mine),
                        ", ".join(f"{r['ops_per_sec']:,.0f}" for r in mine))
    a, k = med["af_xdp"], med["kernel"]
    print(f"| {pipeline} | {a[0]:,.0f} | {k[0]:,.0f} | **{a[0] / k[0]:.2f}** | {a[1]:.0f} / {k[1]:.0f} us | {a[2] + k[2]} |")
    print(f"<!-- pipeline {pipeline} rounds: af_xdp {a[3]}; kernel {k[3]} -->")
PY
echo
echo "af_xdp tandemd's stats net at the end:"
in_client bash -c "exec 3<>/dev/tcp/$xdp_ip/$port && printf 'stats net\r\n' >&3 && timeout 2 cat <&3" | tr -d '\r' | grep -E 'STAT (tcp_|rx_|tx_|backend)' | tr '\n' ' ' || true
echo
