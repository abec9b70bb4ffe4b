#!/usr/bin/env bash
# The benchmark, side by side in one run on loopback (see BENCHMARKS.md for what each row means):
#
#   bench/run.sh            build release binaries, measure every scenario, print the table
#   bench/run.sh --quick    a few hundred calls per scenario with the binaries already in BENCH_BIN_DIR
#                           (the test suite's check that the harness works; its figures mean nothing)
#
# Every gRPC row: examples/loadgen.rs, CreateChatToken with 64 calls in flight over 4 HTTP/2 connections,
# every status checked. The REST rows: the same calls as an AWS SDK makes them (POST /CreateChatToken,
# JSON), over HTTP/1.1 keep-alive (64 connections) or h2c (4 connections), unsigned or SigV4-signed; their
# ratio is to the gRPC door on the same settings (the embedded defaults row). h2load (Debian's nghttp2-client, installed when missing) cross-checks the first
# two rows. Needs python3, openssl and Redis (127.0.0.1:6379 when it answers, else a redis-server started here).
# Environment: BENCH_REQUESTS (calls per row, default 100000; a row stops after 20 s), BENCH_USERS (distinct users of the RSS row,
# default 1000000), BENCH_BIN_DIR (where the binaries are; default target/release, built here).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = --quick ] && quick=true
if $quick; then
  requests=${BENCH_REQUESTS:-300} warmup=50 users=${BENCH_USERS:-2000} latency_requests=100
else
  requests=${BENCH_REQUESTS:-100000} warmup=2000 users=${BENCH_USERS:-1000000} latency_requests=3000
fi
ivs_requests=$((requests / 5))

if [ -z "${BENCH_BIN_DIR:-}" ]; then
  cargo build --release --locked --quiet --bin chat-token-service \
    --example loadgen --example bench_baseline --example ivschat_stub
  BENCH_BIN_DIR=target/release
fi
service=$BENCH_BIN_DIR/chat-token-service
loadgen=$BENCH_BIN_DIR/examples/loadgen
baseline=$BENCH_BIN_DIR/examples/bench_baseline
stub=$BENCH_BIN_DIR/examples/ivschat_stub

if ! $quick && ! command -v h2load >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nghttp2-client >/dev/null
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Up to 60 s: the --quick run's debug binary loads the 20,000-entity file slowly on a busy machine.
wait_for_port() {
  for _ in $(seq 1 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listening on port $1; log:" >&2
  cat "$work/server.log" >&2
  return 1
}

# Rows of the table: scenario, then loadgen's key=value output.
results=$work/results
: >"$results"

# measure NAME LOADGEN-ARGS...: one loadgen run, recorded as a row; a failed call fails the benchmark.
measure() {
  local name=$1; shift
  local out
  if ! out=$("$loadgen" "$@" 2>"$work/loadgen.err"); then
    echo "$name: $(cat "$work/loadgen.err")" >&2
    exit 1
  fi
  printf '%s\t%s\n' "$name" "$out" >>"$results"
  printf '  %-44s %s\n' "$name" "$out" >&2
}

# start ENV...: runs the service with the embedded defaults overridden by ENV, on a fresh port. No drain
# delay: nothing routes to it once its row is measured, and each stop would otherwise wait 5 s.
start_service() {
  port=$(free_port)
  env -u RUST_LOG CTS_SHUTDOWN_DRAIN_DELAY=0s "$@" CTS_LISTEN_ADDR="127.0.0.1:$port" "$service" \
    2>"$work/server.log" &
  server_pid=$!
  pids+=("$server_pid")
  wait_for_port "$port"
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}

grpc_load() {
  echo grpc --addr "127.0.0.1:$port" --requests "$requests" --warmup "$warmup" \
    --concurrency 64 --connections 4 --server-pid "$server_pid"
}

# h2load cross-check: the same request bytes as loadgen's default call (gRPC frame: flag 0, big-endian
# length, protobuf), 4 connections x 16 streams. It does not read gRPC trailers, so only its req/s and
# mean latency are reported.
h2load_row() {
  $quick && return 0
  local name=$1
  python3 - "$work/token.bin" <<'PY'
import struct, sys
def field(number, text):
    data = text.encode()
    return bytes([number << 3 | 2, len(data)]) + data
message = field(1, "arn:aws:ivschat:us-west-2:111111111111:room/lobby") + field(2, "user-0")
open(sys.argv[1], "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
PY
  h2load -n "$requests" -c 4 -m 16 -t 1 -d "$work/token.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$port/ivschat.v1.TokenService/CreateChatToken" >"$work/h2load.out"
  local rps mean
  rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$work/h2load.out")
  mean=$(awk '/^time for request:/ {print $6}' "$work/h2load.out")
  printf '%s\th2load rps=%s mean=%s\n' "$name" "$rps" "$mean" >>"$results"
  printf '  %-44s h2load rps=%s mean=%s\n' "$name" "$rps" "$mean" >&2
}

production=(
  CTS_POLICY__FILES='["deploy/policy/production.cedar"]'
  CTS_IDENTITY__SOURCES='["header"]'
  CTS_IDENTITY__ANONYMOUS_PRINCIPAL=spiffe://cluster.local/ns/chat/sa/web
)
three_limits='[{name="caller",key="caller",rate="1000000/s",burst=1000000},
  {name="user",key="user",rate="1000000/s",burst=1000000},
  {name="room",key="room",rate="1000000/s",burst=1000000}]'

# The production entities plus 20,000 more callers, each in the web group.
python3 - deploy/policy/production.entities.json "$work/entities-20k.json" <<'PY'
import json, sys
entities = json.load(open(sys.argv[1]))
for i in range(20_000 - len(entities)):
    entities.append({
        "uid": {"type": "Caller", "id": f"spiffe://cluster.local/ns/tenant-{i}/sa/web"},
        "attrs": {"accounts": [f"{100000000000 + i}"]},
        "parents": [{"type": "Group", "id": "web"}],
    })
json.dump(entities, open(sys.argv[2], "w"))
PY
# The production entities plus 1,000 callers (loadgen --callers: caller-N), serving the rooms' account.
python3 - deploy/policy/production.entities.json "$work/entities-callers.json" <<'PY'
import json, sys
entities = json.load(open(sys.argv[1]))
for i in range(1000):
    entities.append({
        "uid": {"type": "Caller", "id": f"spiffe://cluster.local/ns/caller-{i}/sa/web"},
        "attrs": {"accounts": ["111111111111"]},
        "parents": [{"type": "Group", "id": "web"}],
    })
json.dump(entities, open(sys.argv[2], "w"))
PY
# The SigV4 rows' key.
sigv4_key=CTSBENCH000000000001:benchSecretAccessKey0000000000000000000
printf '[[keys]]\naccess_key_id = "%s"\nsecret_access_key = "%s"\nprincipal = "%s"\n' \
  "${sigv4_key%%:*}" "${sigv4_key#*:}" spiffe://cluster.local/ns/chat/sa/web >"$work/sigv4-credentials.toml"

echo "measuring ($requests calls per row; $users distinct users for the RSS row)" >&2

port=$(free_port)
"$baseline" "127.0.0.1:$port" >/dev/null 2>"$work/server.log" &
server_pid=$!
pids+=("$server_pid")
wait_for_port "$port"
# shellcheck disable=SC2046
measure "baseline: bare tonic, fixed token" $(grpc_load)
h2load_row "baseline: bare tonic, fixed token"
stop_server

start_service
# shellcheck disable=SC2046
measure "embedded defaults (audit on)" $(grpc_load)
h2load_row "embedded defaults (audit on)"
http_load() {
  echo http --addr "127.0.0.1:$port" --requests "$requests" --warmup "$warmup" --concurrency 64 \
    --connections 4 --server-pid "$server_pid"
}
# shellcheck disable=SC2046
measure "REST door, HTTP/1.1 keep-alive" $(http_load)
# shellcheck disable=SC2046
measure "REST door, h2c" $(http_load) --h2c
stop_server

start_service CTS_IDENTITY__SOURCES='["sigv4", "header"]' \
  CTS_IDENTITY__SIGV4__CREDENTIALS_FILE="$work/sigv4-credentials.toml"
# shellcheck disable=SC2046
measure "REST door, HTTP/1.1, SigV4-signed" $(http_load) --sign "$sigv4_key"
# shellcheck disable=SC2046
measure "REST door, h2c, SigV4-signed" $(http_load) --h2c --sign "$sigv4_key"
stop_server

start_service "${production[@]}" CTS_POLICY__ENTITIES_FILE=deploy/policy/production.entities.json \
  CTS_RATE_LIMITS="$three_limits"
# shellcheck disable=SC2046
measure "production policy + 3 memory limits" $(grpc_load)
stop_server

# End-user binding: the caller is end-user-facing (the production policy then requires binding) and every
# call forwards user-0's RS256 ID token, verified against a JWK set file (no identity provider to reach).
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -outform DER -out "$work/end-user-key.der" 2>/dev/null
end_user_token=$("$loadgen" end-user-token --rsa-key "$work/end-user-key.der" --jwks "$work/end-user-jwks.json" \
  --issuer https://id.example.com --audience chat-app --sub user-0)
start_service CTS_POLICY__FILES='["deploy/policy/production.cedar"]' CTS_IDENTITY__SOURCES='["header"]' \
  CTS_IDENTITY__ANONYMOUS_PRINCIPAL=spiffe://cluster.local/ns/chat/sa/web-gateway \
  CTS_POLICY__ENTITIES_FILE=deploy/policy/production.entities.json CTS_RATE_LIMITS="$three_limits" \
  CTS_END_USER__ISSUERS="[{issuer=\"https://id.example.com\",audiences=[\"chat-app\"],jwks_file=\"$work/end-user-jwks.json\"}]"
# shellcheck disable=SC2046
measure "  same, bound to the end user (RS256)" $(grpc_load) --end-user-token "$end_user_token"
stop_server

start_service "${production[@]}" CTS_POLICY__ENTITIES_FILE="$work/entities-20k.json" \
  CTS_RATE_LIMITS="$three_limits"
# shellcheck disable=SC2046
measure "  same, 20,000 entities" $(grpc_load)
stop_server

start_service "${production[@]}" CTS_POLICY__ENTITIES_FILE="$work/entities-callers.json" \
  CTS_RATE_LIMITS="$three_limits"
# Measured in steady state, as the one-room row is: every one of the 10,000 (caller, room) pairs is decided
# once in the warm-up (10,000 calls), so the row shows what many live pairs cost once they are known (the
# caches' hit path, the memory of 10,000 decisions), not 10,000 first decisions.
rooms_warmup=10000
$quick && rooms_warmup=$warmup
measure "  same, 10,000 rooms × 1,000 callers" grpc --addr "127.0.0.1:$port" --requests "$requests" \
  --warmup "$rooms_warmup" --concurrency 64 --connections 4 --server-pid "$server_pid" --rooms 10000 --callers 1000
stop_server

redis_port=6379
if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  pids+=("$!")
  wait_for_port "$redis_port"
fi
start_service "${production[@]}" CTS_POLICY__ENTITIES_FILE=deploy/policy/production.entities.json \
  CTS_RATE_LIMITS="$three_limits" CTS_LIMITER__BACKEND=redis \
  CTS_LIMITER__REDIS_URL="redis://127.0.0.1:$redis_port" CTS_LIMITER__KEY_PREFIX="bench$$"
# shellcheck disable=SC2046
measure "production policy + 3 Redis limits" $(grpc_load)
stop_server

stub_port=$(free_port)
"$stub" "127.0.0.1:$stub_port" >/dev/null &
pids+=("$!")
wait_for_port "$stub_port"
ivs=(
  CTS_ISSUER=ivs CTS_IVS__ENDPOINT_URL="http://127.0.0.1:$stub_port" CTS_IVS__QUOTA=1000000/s
  CTS_IVS__QUOTA_BURST=1000000 AWS_ACCESS_KEY_ID=stub AWS_SECRET_ACCESS_KEY=stub AWS_EC2_METADATA_DISABLED=true
)
measure "IVS stub straight through aws-sdk, 1 in flight" ivs --endpoint "http://127.0.0.1:$stub_port" \
  --requests "$latency_requests" --warmup "$warmup" --concurrency 1
start_service "${ivs[@]}"
measure "  through the service, 1 in flight" grpc --addr "127.0.0.1:$port" \
  --requests "$latency_requests" --warmup "$warmup" --concurrency 1 --connections 1 --server-pid "$server_pid"
stop_server
measure "IVS stub straight through aws-sdk" ivs --endpoint "http://127.0.0.1:$stub_port" \
  --requests "$ivs_requests" --warmup "$warmup"
start_service "${ivs[@]}"
measure "  through the service" grpc --addr "127.0.0.1:$port" --requests "$ivs_requests" \
  --warmup "$warmup" --concurrency 64 --connections 4 --server-pid "$server_pid"
stop_server

# 10/h: every user's state is still live at the end (a recovered key is forgotten, which would hide it).
start_service CTS_RATE_LIMITS='[{name="user",key="user",rate="10/h",burst=5}]'
measure "$users distinct users, 1 per-user limit" grpc --addr "127.0.0.1:$port" --requests "$users" \
  --warmup 0 --max-seconds 240 --users "$users" --concurrency 64 --connections 4 --server-pid "$server_pid"
stop_server

port=$(free_port)
# Exec to SERVING: the best of five starts (the first may find the binary's pages still on disk).
for _ in 1 2 3 4 5; do
  env -u RUST_LOG CTS_LISTEN_ADDR="127.0.0.1:$port" \
    "$loadgen" startup --addr "127.0.0.1:$port" -- "$service" 2>"$work/server.log" >>"$work/startup" || {
    cat "$work/server.log" >&2
    exit 1
  }
done
printf 'exec to SERVING, embedded defaults\t%s\n' "$(sort -t= -k2 -n "$work/startup" | head -1)" >>"$results"

python3 - "$results" <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
def fields(text):
    return dict(part.split("=", 1) for part in text.split() if "=" in part)
print(f"{'scenario':<46} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} "
      f"{'errors':>6} {'peak RSS MiB':>12} {'CPU µs/call':>11} {'CPU ratio':>9}")
baseline = previous = grpc_door = baseline_cpu = None
for name, text in rows:
    f = fields(text)
    if text.startswith("h2load"):
        print(f"{'  h2load cross-check':<46} {float(f['rps']):>8.0f} {'':>6} mean {f['mean']}")
        continue
    if "serving_ms" in f:
        print(f"{name:<46} {f['serving_ms']:>8} ms")
        continue
    rps = float(f["rps"])
    baseline = baseline or rps
    if name.startswith("embedded defaults"):
        grpc_door = rps
    # Ratios to the baseline; the service's IVS rows to the direct SDK call just above them, the REST
    # door's to the gRPC door on the same settings.
    if "through the service" in name:
        reference = previous
    elif name.startswith("REST door"):
        reference = grpc_door
    else:
        reference = baseline
    previous = rps
    ms = lambda key: f"{int(f[key]) / 1000:.2f}"
    rss = f"{int(f['rss_peak_kib']) / 1024:.0f}" if "rss_peak_kib" in f else ""
    # The server's own CPU per call, and its ratio to bare tonic's (the baseline row's).
    cpu = float(f["server_cpu_us"]) if "server_cpu_us" in f else None
    baseline_cpu = baseline_cpu or cpu
    cpu_text = f"{cpu:.1f}" if cpu is not None else ""
    cpu_ratio = f"{cpu / baseline_cpu:.2f}" if cpu and baseline_cpu else ""
    print(f"{name:<46} {rps:>8.0f} {rps / reference:>6.2f} {ms('p50_us'):>7} {ms('p99_us'):>7} "
          f"{ms('p999_us'):>8} {f['errors']:>6} {rss:>12} {cpu_text:>11} {cpu_ratio:>9}")
PY
