#!/usr/bin/env bash
# Instructions per CreateChatToken call in the server, counted by valgrind's callgrind: repeatable on a busy
# machine, where wall-clock figures move ±20%. What BENCHMARKS.md's "Optimisations" figures come from.
#
#   bench/callgrind.sh baseline 2000      bare tonic serving the same proto (examples/bench_baseline.rs, a
#                                         fixed token): what the service's own work adds is measured against it
#   bench/callgrind.sh embedded 2000      the embedded defaults, 2,000 calls measured
#   bench/callgrind.sh production 2000    deploy/policy/production.cedar + entities, 3 memory limits
#   bench/callgrind.sh redis 2000         the same limits in Redis (REDIS_URL, default redis://127.0.0.1:6379);
#                                         only the service's instructions are counted, not Redis's
#   bench/callgrind.sh end-user 2000      production, every call bound to its end user by an RS256 ID token
#                                         (a JWK set file and a token made ahead of time by loadgen)
#   bench/callgrind.sh rooms 2000         production with 1,000 more callers, calls over 10,000 rooms × 1,000
#                                         callers (10,000 distinct pairs, all seen in a 10,000-call warm-up)
#   bench/callgrind.sh http1 2000         the embedded defaults through the REST-JSON door, HTTP/1.1 keep-alive
#   bench/callgrind.sh h2c 2000           the same over h2c
#   bench/callgrind.sh http1-sigv4 2000   the same as http1, every call SigV4-signed (identity.sources sigv4)
#   bench/callgrind.sh h2c-sigv4 2000     the same as h2c, every call SigV4-signed
#
# The server runs under callgrind with instrumentation off; loadgen makes 300 warm-up calls, then
# instrumentation is switched on for CALLS calls (64 in flight over 4 connections) and the counts dumped.
# Prints the instructions per call and leaves the profile in $CALLGRIND_OUT (default target/callgrind/) for
# `callgrind_annotate --inclusive=yes`. Counts are user-space instructions: system calls' kernel time is not
# in them. Build with frame pointers for readable profiles:
#   RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target/fp cargo build --release \
#     --bin chat-token-service --example loadgen
# and point BENCH_BIN_DIR at target/fp/release (default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."

scenarios="baseline, embedded, production, redis, end-user, rooms, http1, h2c, http1-sigv4 or h2c-sigv4"
scenario=${1:?$scenarios} calls=${2:-2000}
bin_dir=${BENCH_BIN_DIR:-target/release}
out_dir=${CALLGRIND_OUT:-target/callgrind}
command -v valgrind >/dev/null || {
  echo "valgrind is needed (Debian package valgrind)" >&2
  exit 1
}
mkdir -p "$out_dir"
loadgen_args=() door=grpc warmup=300
program=chat-token-service
case $scenario in
  baseline) settings=() program=examples/bench_baseline ;;
  embedded) settings=() ;;
  http1 | h2c | http1-sigv4 | h2c-sigv4)
    settings=() door=http
    [ "${scenario#h2c}" != "$scenario" ] && loadgen_args+=(--h2c)
    if [ "${scenario%-sigv4}" != "$scenario" ]; then
      key_id=CTSBENCH000000000001 secret=benchSecretAccessKey0000000000000000000
      printf '[[keys]]\naccess_key_id = "%s"\nsecret_access_key = "%s"\nprincipal = "%s"\n' \
        "$key_id" "$secret" spiffe://cluster.local/ns/chat/sa/web >"$out_dir/sigv4-credentials.toml"
      settings=(
        CTS_IDENTITY__SOURCES='["sigv4", "header"]'
        CTS_IDENTITY__SIGV4__CREDENTIALS_FILE="$out_dir/sigv4-credentials.toml"
      )
      loadgen_args+=(--sign "$key_id:$secret")
    fi
    ;;
  production | redis | end-user | rooms)
    settings=(
      CTS_POLICY__FILES='["deploy/policy/production.cedar"]'
      CTS_POLICY__ENTITIES_FILE=deploy/policy/production.entities.json
      CTS_IDENTITY__SOURCES='["header"]'
      CTS_IDENTITY__ANONYMOUS_PRINCIPAL=spiffe://cluster.local/ns/chat/sa/web
      CTS_RATE_LIMITS='[{name="caller",key="caller",rate="1000000/s",burst=1000000},
        {name="user",key="user",rate="1000000/s",burst=1000000},
        {name="room",key="room",rate="1000000/s",burst=1000000}]'
    )
    if [ "$scenario" = end-user ]; then
      # The caller is end-user-facing (production policy: binding required); every call forwards user-0's
      # RS256 ID token, verified against a JWK set file (no identity provider to reach).
      openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -outform DER -out "$out_dir/end-user-key.der" 2>/dev/null
      token=$("$bin_dir/examples/loadgen" end-user-token --rsa-key "$out_dir/end-user-key.der" \
        --jwks "$out_dir/end-user-jwks.json" --issuer https://id.example.com --audience chat-app --sub user-0)
      loadgen_args=(--end-user-token "$token")
      settings[3]=CTS_IDENTITY__ANONYMOUS_PRINCIPAL=spiffe://cluster.local/ns/chat/sa/web-gateway
      settings+=(
        CTS_END_USER__ISSUERS="[{issuer=\"https://id.example.com\",audiences=[\"chat-app\"],jwks_file=\"$out_dir/end-user-jwks.json\"}]"
      )
    fi
    if [ "$scenario" = rooms ]; then
      # 1,000 more callers in the web group, serving the rooms' account; every (caller, room) pair of the
      # measured calls was decided once in the warm-up.
      python3 - deploy/policy/production.entities.json "$out_dir/entities-callers.json" <<'PY'
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
      settings[1]=CTS_POLICY__ENTITIES_FILE="$out_dir/entities-callers.json"
      loadgen_args=(--rooms 10000 --callers 1000)
      warmup=10000
    fi
    if [ "$scenario" = redis ]; then
      settings+=(
        CTS_LIMITER__BACKEND=redis
        CTS_LIMITER__REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
        CTS_LIMITER__KEY_PREFIX="callgrind$$"
        # Under valgrind the service runs tens of times slower: with the default 50 ms a share of the
        # calls would time out and be decided in process, mixing two paths into the count.
        CTS_LIMITER__REDIS_TIMEOUT=10s
      )
    fi
    ;;
  *)
    echo "unknown scenario $scenario: $scenarios" >&2
    exit 1
    ;;
esac

out=$out_dir/$scenario.callgrind
rm -f "$out" "$out".*
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
program_args=()
# The baseline takes its address as its argument; the service reads CTS_LISTEN_ADDR.
[ "$scenario" = baseline ] && program_args=("127.0.0.1:$port")
# CALLGRIND_ARGS adds valgrind options, e.g. "--cache-sim=yes" for simulated cache misses (D1mr, DLmr).
# shellcheck disable=SC2086
env -u RUST_LOG "${settings[@]}" CTS_LISTEN_ADDR="127.0.0.1:$port" valgrind --tool=callgrind ${CALLGRIND_ARGS:-} \
  --instr-atstart=no --callgrind-out-file="$out" "$bin_dir/$program" "${program_args[@]}" \
  2>"$out_dir/$scenario.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

# Both loads start at call 0: the measured calls are ones the warm-up made (same rooms, callers, users).
load() {
  "$bin_dir/examples/loadgen" "$door" --addr "127.0.0.1:$port" --requests "$1" --warmup 0 \
    --concurrency 64 --connections 4 --max-seconds 600 "${loadgen_args[@]}" >/dev/null
}
load "$warmup"
callgrind_control --instr=on "$server" >/dev/null 2>&1
load "$calls"
callgrind_control --dump "$server" >/dev/null 2>&1
callgrind_control --instr=off "$server" >/dev/null 2>&1
kill "$server"
wait "$server" 2>/dev/null || true

total=$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$scenario: $((total / calls)) instructions per call ($calls calls; profile $out.1)"
