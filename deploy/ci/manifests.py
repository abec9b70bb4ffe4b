"""Validates deploy/'s Kubernetes manifests and lays out what a pod or compose container would mount.

    manifests.py validate              every manifest file, and every overlay x mesh x component
                                       combination as kustomize renders it, checked against the schemas
                                       and against what the combination promises; the metric names of
                                       deploy/observability against src/telemetry/metrics.rs
    manifests.py stage COMBINATION DEST   what the rendered Deployment mounts and sets, e.g.
                                       `stage local-issuer+istio DEST` (an overlay, then components)
    manifests.py stage-compose SERVICE DEST   the compose service's bind mounts where it mounts them
    manifests.py rules DEST            deploy/observability's PrometheusRule groups as a plain rule file
                                       (for promtool)

Kubernetes kinds are checked against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields are errors, and so is a kind without a schema); Istio, cert-manager and Prometheus Operator kinds
against their projects' models (cloudcoil), with any field the model does not know reported as an error.
The stage commands write DEST/root/... (the container's view of its mounts), DEST/env (NAME=VALUE lines
the container gets) and DEST/secrets (one "NAME KEY PATH" line per Secret the manifests expect to exist:
CI makes stand-ins).
"""

import hashlib
import importlib
import itertools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
REPO = DEPLOY.parent
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = KUBERNETES / "overlays"
COMPONENTS = KUBERNETES / "components"
OBSERVABILITY = DEPLOY / "observability"
RULES = OBSERVABILITY / "prometheus" / "prometheusrule.yaml"
DASHBOARD = OBSERVABILITY / "prometheus" / "grafana-dashboard.json"
KUBERNETES_VERSION = "1.30.0"

# The optional components, and what each needs beside it. "istio" is the mesh axis, not an option.
OPTIONAL = {
    "networkpolicy": set(),
    "zone-spread-strict": set(),
    "autoscaling": set(),
    "aws-irsa": set(),
    "cert-manager": set(),
    "istio-reflection": {"istio"},
    "networkpolicy-istio": {"istio", "networkpolicy"},
}
# The paths the service documents: gRPC services, health, and the IVS REST-JSON API.
DOCUMENTED_PATHS = {
    "/ivschat.v1.TokenService/*",
    "/ivschat.v1.ModerationService/*",
    "/ivschat.v1.MessagingService/*",
    "/grpc.health.v1.Health/*",
    "/CreateChatToken",
    "/DisconnectUser",
    "/SendEvent",
    "/DeleteMessage",
}
REFLECTION_PATHS = {"/grpc.reflection.v1.ServerReflection/*", "/grpc.reflection.v1alpha.ServerReflection/*"}
# Kinds from projects other than Kubernetes, by API group: the cloudcoil module that models them.
MODELS = {
    "networking.istio.io": "cloudcoil.models.istio.networking",
    "security.istio.io": "cloudcoil.models.istio.security",
    "cert-manager.io": "cloudcoil.models.cert_manager",
    "monitoring.coreos.com": "cloudcoil.models.prometheus_operator",
}


def kustomize(directory: pathlib.Path) -> list[dict]:
    """The directory's resources as `kubectl apply -k` would send them."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render(combination: str) -> list[dict]:
    """`overlay+component+…` rendered as a kustomization of the user's would: the overlay as its
    resource, the components in the order given."""
    overlay, *components = combination.split("+")
    scratch = REPO / "target" / "deploy-renders"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as directory:
        here = pathlib.Path(directory)
        relative = lambda path: str(pathlib.Path(*[".."] * len(here.relative_to(REPO).parts)) / path.relative_to(REPO))  # noqa: E731
        (here / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [relative(OVERLAYS / overlay)],
                    "components": [relative(COMPONENTS / c) for c in components],
                }
            )
        )
        return kustomize(here)


def combinations() -> list[str]:
    """Every issuer overlay, without and with Istio, with every allowed set of optional components."""
    result = []
    for overlay in sorted(p.name for p in OVERLAYS.iterdir()):
        for mesh in ([], ["istio"]):
            names = [n for n, needs in OPTIONAL.items() if needs <= set(mesh) | set(OPTIONAL)]
            for count in range(len(names) + 1):
                for chosen in itertools.combinations(names, count):
                    present = set(mesh) | set(chosen)
                    if all(OPTIONAL[c] <= present for c in chosen):
                        result.append("+".join([overlay, *mesh, *chosen]))
    return result


def unknown_fields(given, kept, path: str = "") -> list[str]:
    """Fields of `given` that a model dropped (`kept` is its dump): fields the kind does not have."""
    if isinstance(given, dict) and isinstance(kept, dict):
        problems = []
        for key, value in given.items():
            if key not in kept:
                if value is not None:
                    problems.append(f"{path}.{key}")
            else:
                problems += unknown_fields(value, kept[key], f"{path}.{key}")
        return problems
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (g, k) in enumerate(zip(given, kept)) for p in unknown_fields(g, k, f"{path}[{i}]")]
    return []


def check(doc: dict) -> None:
    """Raises when `doc` is not a valid resource of its kind."""
    group, _, version = doc["apiVersion"].rpartition("/")
    if group in MODELS:
        module = importlib.import_module(f"{MODELS[group]}.{version}")
        model = getattr(module, doc["kind"]).model_validate(doc)
        kept = model.model_dump(by_alias=True, exclude_none=True, mode="json")
        if unknown := unknown_fields(doc, kept):
            raise ValueError(f"unknown fields {', '.join(unknown)}")
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def promises(combination: str, docs: list[dict]) -> list[str]:
    """What this combination must be, beyond valid: the problems found (none when it keeps them)."""
    parts = set(combination.split("+"))
    problems = []
    expect = lambda ok, what: ok or problems.append(what)  # noqa: E731
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {v["name"]: v.get("value") for v in container.get("env", [])}
    istio_kinds = sorted({d["kind"] for d in docs if d["apiVersion"].split("/")[0].endswith(".istio.io")})
    expect(pod.get("enableServiceLinks") is False, "enableServiceLinks is not false")
    zone = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"]
    wanted = "DoNotSchedule" if "zone-spread-strict" in parts else "ScheduleAnyway"
    expect([c["whenUnsatisfiable"] for c in zone] == [wanted], f"zone spread is not {wanted}")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    if "istio" in parts:
        expect(env.get("CTS_IDENTITY__SOURCES") == '["xfcc"]', "behind Istio the identity is not xfcc")
        expect(not any(n.startswith("CTS_TLS__") for n in env), "behind Istio the service still terminates TLS")
        expect("/etc/chat-token-service/tls" not in mounts, "behind Istio the TLS Secret is still mounted")
        expect(all("grpc" in container[p] for p in ("readinessProbe", "livenessProbe", "startupProbe")),
               "behind Istio the probes are not gRPC health checks")
        paths = set()
        for policy in (d for d in docs if d["kind"] == "AuthorizationPolicy"):
            for rule in policy["spec"]["rules"]:
                for to in rule.get("to", []):
                    paths |= set(to["operation"].get("paths", []))
        expect(DOCUMENTED_PATHS <= paths, f"AuthorizationPolicy misses {sorted(DOCUMENTED_PATHS - paths)}")
        has_reflection = REFLECTION_PATHS <= paths
        expect(has_reflection == ("istio-reflection" in parts), "reflection admitted without its component, or not with it")
    else:
        expect(not istio_kinds, f"renders Istio kinds without the istio component: {istio_kinds}")
        expect(env.get("CTS_IDENTITY__SOURCES") == '["mtls"]', "without a mesh the identity is not mtls")
        expect(all(f"CTS_TLS__{n}" in env for n in ("CERT_FILE", "KEY_FILE", "CLIENT_CA_FILE")),
               "without a mesh the service does not terminate mutual TLS")
        expect("/etc/chat-token-service/tls" in mounts, "without a mesh the TLS Secret is not mounted")
        command = container["readinessProbe"].get("exec", {}).get("command", [])
        expect(command[:2] == ["/usr/local/bin/chat-token-service", "health"],
               "without a mesh readiness is not the service's health check over its TLS")
    if "autoscaling" in parts:
        hpa = one(docs, "HorizontalPodAutoscaler")
        (metric,) = hpa["spec"]["metrics"]
        expect(metric["type"] == "ContainerResource"
               and metric["containerResource"]["container"] == container["name"],
               "the autoscaler does not scale on the service container's CPU")
        expect("replicas" not in deployment["spec"], "the Deployment still sets replicas beside its autoscaler")
    else:
        expect(not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "an autoscaler without its component")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if "networkpolicy" in parts:
        egress = [(peer, port) for p in policies for rule in p["spec"].get("egress", [])
                  for peer in rule.get("to", []) for port in rule.get("ports", [])]
        reaches = lambda cidr, number: any(peer.get("ipBlock", {}).get("cidr") == cidr and port["port"] == number  # noqa: E731
                                           for peer, port in egress)
        expect(reaches("169.254.170.23/32", 80), "EKS Pod Identity's agent is not reachable")
        expect(reaches("0.0.0.0/0", 443), "public AWS endpoints (IVS, STS) are not reachable")
        expect(reaches("10.0.0.0/8", 443), "VPC interface endpoints are not reachable")
        collector = [peer for peer, port in egress if port["port"] == 4317]
        expect(any(peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "opentelemetry-collector"}
                   for peer in collector), "the collector is not selected by the official Helm chart's label")
        expect(any(port["port"] == 6379 and port.get("endPort") == 6380 for _, port in egress), "Redis is not reachable")
    else:
        expect(not policies, "NetworkPolicies without their component")
    return problems


def manifest_files() -> list[pathlib.Path]:
    """The YAML manifests under deploy/ that are Kubernetes resources (not kustomize's own files, not
    patches, not the compose stack or the collector's own configuration)."""
    files = []
    for path in sorted(KUBERNETES.rglob("*.yaml")) + sorted(OBSERVABILITY.rglob("*.yaml")):
        if path.name in ("kustomization.yaml",) or path.name.endswith("-patch.yaml") or "tests" in path.parts:
            continue
        if path.name == "collector-config.yaml":
            continue
        files.append(path)
    return files


PROM_SUFFIXES = {"s": "_seconds", "ms": "_milliseconds", "By": "_bytes", "1": "_ratio"}


def exported_metric_names() -> set[str]:
    """The names Prometheus sees for the instruments in src/telemetry/metrics.rs, once the collector's
    Prometheus exporter has translated them (its default, UnderscoreEscapingWithSuffixes): dots become
    underscores, a unit becomes a suffix (`{…}` annotations give none), counters end in _total,
    histograms come as _bucket, _sum and _count."""
    source = (REPO / "src" / "telemetry" / "metrics.rs").read_text()
    names = set()
    pattern = r'\.(u64_counter|f64_histogram|i64_observable_gauge|u64_observable_counter)\(\s*"([^"]+)"\s*\)\s*\.with_unit\("([^"]*)"\)'
    for kind, name, unit in re.findall(pattern, source):
        base = name.replace(".", "_") + PROM_SUFFIXES.get(unit, "")
        if kind.endswith("counter"):
            names.add(base + "_total")
        elif kind == "f64_histogram":
            names |= {base + "_bucket", base + "_sum", base + "_count"}
        else:
            names.add(base)
    return names


RAW_METRIC = re.compile(r"\b(cts_[a-z_]+|rpc_server_[a-z_]+|http_server_[a-z_]+)\b")


def check_metric_names() -> list[str]:
    """deploy/observability names each raw metric in one place per file (the PrometheusRule's recording
    group, the dashboard's constant variables); every one must be a metric the service exports."""
    known = exported_metric_names()
    problems = [] if known else ["no metric found in src/telemetry/metrics.rs"]
    rule = yaml.safe_load(RULES.read_text())
    for group in rule["spec"]["groups"]:
        for entry in group["rules"]:
            raw = set(RAW_METRIC.findall(entry["expr"]))
            if group["name"] != "chat-token-service.metrics" and raw:
                problems.append(f"prometheusrule.yaml: {group['name']} names raw metrics {sorted(raw)}; use the recorded series")
            problems += [f"prometheusrule.yaml: {m} is not a metric the service exports" for m in raw - known]
    dashboard = json.loads(DASHBOARD.read_text())
    constants = {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "constant"}
    problems += [f"grafana-dashboard.json: ${n} = {m} is not a metric the service exports"
                 for n, m in constants.items() if m not in known]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if raw := set(RAW_METRIC.findall(target["expr"])):
                problems.append(f"grafana-dashboard.json: panel {panel['title']!r} names {sorted(raw)}; use the constants")
    return problems


def validate() -> int:
    failures = passed = 0
    seen: dict[str, str] = {}

    def report(source: str, doc: dict) -> None:
        nonlocal failures, passed
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        if digest in seen:
            passed += 1
            return
        try:
            check(doc)
            seen[digest] = source
            passed += 1
            print(f"ok      {source}: {name}")
        except Exception as error:  # every kind of validation failure is reported the same way
            failures += 1
            print(f"INVALID {source}: {name}: {error}")

    for path in manifest_files():
        for doc in filter(None, yaml.safe_load_all(path.read_text())):
            report(str(path.relative_to(REPO)), doc)
    kustomizations = [p.parent for p in sorted(DEPLOY.rglob("kustomization.yaml"))]
    for directory in kustomizations:
        if yaml.safe_load((directory / "kustomization.yaml").read_text())["kind"] == "Kustomization":
            for doc in kustomize(directory):
                report(f"kubectl kustomize {directory.relative_to(REPO)}", doc)
    every = combinations()
    for combination in every:
        docs = render(combination)
        for doc in docs:
            report(combination, doc)
        for problem in promises(combination, docs):
            failures += 1
            print(f"BROKEN  {combination}: {problem}")
    print(f"rendered {len(every)} combinations; {len(seen)} distinct resources validated")
    for problem in check_metric_names():
        failures += 1
        print(f"METRIC  {problem}")
    print(f"{passed} passed, {failures} failed")
    return 1 if failures else 0


def write(root: pathlib.Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def quantity(text: str) -> int:
    """A Kubernetes quantity in its base unit: "512Mi" is 536870912, "1G" 1000000000."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


def stage(combination: str, dest: pathlib.Path) -> int:
    docs = render(combination)
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    env, secrets = [], []
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            for key, text in config_maps[volume["configMap"]["name"]]["data"].items():
                write(dest / "root", f"{mount['mountPath']}/{key}", text)
        elif "secret" in volume:
            secrets.append(f"{volume['secret']['secretName']} * {mount['mountPath']}")
        else:
            raise SystemExit(f"volume {mount['name']}: only ConfigMaps and Secrets are staged")
    fields = {"metadata.name": "chat-token-service-ci-0", "metadata.namespace": "chat"}
    values = {}
    for var in container.get("env", []):
        if "value" in var:
            # $(NAME) refers to a variable defined before it, as the kubelet expands it.
            value = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            value = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in var.get("valueFrom", {}):
            # The kubelet gives a resource in its base unit: bytes for memory.
            kind, resource = var["valueFrom"]["resourceFieldRef"]["resource"].split(".")
            value = str(quantity(container["resources"][kind][resource]))
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            secrets.append(f"{ref['name']} {ref['key']} env:{var['name']}")
            continue
        values[var["name"]] = value
        env.append(f"{var['name']}={value}")
    (dest / "env").write_text("".join(f"{line}\n" for line in env))
    (dest / "secrets").write_text("".join(f"{line}\n" for line in secrets))
    # The readiness probe's command when it runs one in the container, one argument per line.
    command = container["readinessProbe"].get("exec", {}).get("command", [])
    (dest / "readiness").write_text("".join(f"{word}\n" for word in command))
    return 0


def stage_compose(service: str, dest: pathlib.Path) -> int:
    compose_dir = DEPLOY / "compose"
    spec = yaml.safe_load((compose_dir / "compose.yaml").read_text())["services"][service]
    for volume in spec.get("volumes", []):
        source, target, *_ = volume.split(":")
        source = (compose_dir / source).resolve()
        target = dest / "root" / target.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    env = spec.get("environment", {})
    (dest / "env").write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    (dest / "secrets").write_text("")
    return 0


def rules(dest: pathlib.Path) -> int:
    rule = yaml.safe_load(RULES.read_text())
    dest.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return 0


def main(args: list[str]) -> int:
    match args:
        case ["validate"]:
            return validate()
        case ["stage", combination, dest]:
            return stage(combination, pathlib.Path(dest))
        case ["stage-compose", service, dest]:
            return stage_compose(service, pathlib.Path(dest))
        case ["rules", dest]:
            return rules(pathlib.Path(dest))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
