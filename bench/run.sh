#!/usr/bin/env bash
# Load benchmark: h2load against the release binary on loopback, CreateChatToken reported as a ratio to the
# gRPC health check measured in the same run on the same server (the baseline: same transport, trivial
# handler). Installs h2load (Debian's nghttp2-client) when missing. Usage: bench/run.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."

requests=${1:-50000}
clients=4
streams=16

command -v h2load >/dev/null || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nghttp2-client >/dev/null
}
cargo build --release --locked --quiet
binary=target/release/chat-token-service
work=$(mktemp -d)
trap 'kill "${server_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

# gRPC frames (flag 0, big-endian length, protobuf) for the two request bodies.
python3 - "$work" <<'PY'
import struct, sys
def field(number, text):
    data = text.encode()
    return bytes([number << 3 | 2, len(data)]) + data
def frame(message):
    return b"\0" + struct.pack(">I", len(message)) + message
out = sys.argv[1]
open(f"{out}/health.bin", "wb").write(frame(field(1, "ivschat.v1.TokenService")))
open(f"{out}/token.bin", "wb").write(frame(
    field(1, "arn:aws:ivschat:us-west-2:111111111111:room/lobby") + field(2, "bench-user")))
PY

# One scenario: start the server with the given environment, load both methods, print a row.
run() {
  local name=$1; shift
  # Audit events stay on (info), as in production.
  env "$@" CTS_LISTEN_ADDR=127.0.0.1:0 RUST_LOG=warn,chat_token_service=info,audit=info \
    "$binary" 2>"$work/server.log" &
  server_pid=$!
  local addr=""
  for _ in $(seq 1 100); do
    addr=$(grep -o 'addr=[0-9.:]*' "$work/server.log" | head -1 | cut -d= -f2) && [ -n "$addr" ] && break
    sleep 0.1
  done
  local row=""
  for method in grpc.health.v1.Health/Check ivschat.v1.TokenService/CreateChatToken; do
    local body=$work/health.bin
    [[ $method == ivschat* ]] && body=$work/token.bin
    h2load -n "$requests" -c "$clients" -m "$streams" -t 1 -d "$body" \
      -H 'content-type: application/grpc' -H 'te: trailers' "http://$addr/$method" >"$work/h2load.out"
    local rps data
    rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$work/h2load.out")
    # h2load does not read gRPC trailers; the bytes received per request show whether calls succeeded
    # (a token response carries a ~600-byte message, a health answer 7 bytes, an error none).
    data=$(awk '/^traffic:/ {for (i = 1; i <= NF; i++) if ($i == "data") print $(i - 1)}' "$work/h2load.out" | tr -d '()')
    row="$row $rps $((data / requests))"
  done
  local rss
  rss=$(ps -o rss= -p "$server_pid")
  kill -INT "$server_pid"; wait "$server_pid" || true
  # shellcheck disable=SC2086
  set -- $row
  awk -v n="$name" -v hr="$1" -v hb="$2" -v tr="$3" -v tb="$4" -v rss="$rss" 'BEGIN {
    printf "%-34s %12.0f %12.0f %8.2f %10d %12d\n", n, hr, tr, tr / hr, tb, rss / 1024 }'
}

printf '%-34s %12s %12s %8s %10s %12s\n' scenario "health req/s" "token req/s" ratio "bytes/call" "RSS MiB"
run "local issuer, dev policy, no limits"
run "+ production policy, 3 limits" \
  CTS_POLICY__FILES='["deploy/policy/production.cedar"]' \
  CTS_POLICY__ENTITIES_FILE=deploy/policy/production.entities.json \
  CTS_IDENTITY__SOURCES='["header"]' CTS_IDENTITY__ANONYMOUS_PRINCIPAL=spiffe://cluster.local/ns/chat/sa/web \
  CTS_RATE_LIMITS='[{name="c",key="caller",rate="1000000/s",burst=1000000},{name="u",key="user",rate="1000000/s",burst=1000000},{name="r",key="room",rate="1000000/s",burst=1000000}]'
