#!/usr/bin/env bash
# The whole test suite, as the README tells a newcomer to run it.
# Installs what the tests need from Debian's packages when it is missing (as root, or through sudo):
# redis-server (the Redis tests reuse 127.0.0.1:6379 or start their own), libfaketime (the clock-skew
# test), Node.js's npx (buf curl smoke test), Python's venv; then the AWS CLI and boto3 from PyPI into
# target/venv (the IVS Chat HTTP API tests; AWS_CLIENTS_VENV names another: not CTS_*, which the
# in-process tests would read as settings). Then runs cargo test; arguments
# go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(libfaketime)
command -v npx >/dev/null || need+=(nodejs npm)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "installing test dependencies: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

export AWS_CLIENTS_VENV="${AWS_CLIENTS_VENV:-$PWD/target/venv}"
if ! "$AWS_CLIENTS_VENV/bin/python" -c 'import boto3, awscli' 2>/dev/null; then
  echo "installing the AWS CLI and boto3 into $AWS_CLIENTS_VENV"
  python3 -m venv "$AWS_CLIENTS_VENV"
  "$AWS_CLIENTS_VENV/bin/pip" install -q --disable-pip-version-check awscli boto3
fi

exec cargo test --locked "$@"
