#!/usr/bin/env bash
# The whole test suite, as the README tells a newcomer to run it.
# Installs what the tests need from Debian's packages when it is missing (as root, or through sudo):
# redis-server (the Redis tests reuse 127.0.0.1:6379 or start their own), libfaketime (the clock-skew
# test), Node.js's npx (buf curl smoke test). Then runs cargo test; arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(libfaketime)
command -v npx >/dev/null || need+=(nodejs npm)
if ((${#need[@]})); then
  echo "installing test dependencies: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

exec cargo test --locked "$@"
