"""Validates deploy/'s Kubernetes manifests and lays out what a pod or compose container would mount.

    manifests.py validate                       every manifest file, and each overlay as kustomize renders it
    manifests.py stage-overlay OVERLAY DEST     the overlay's ConfigMaps where its Deployment mounts them
    manifests.py stage-compose SERVICE DEST     the compose service's bind mounts where it mounts them

Kubernetes kinds are checked against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields are errors, and so is a kind without a schema); Istio kinds against Istio's own models
(cloudcoil-models-istio). The stage commands write DEST/root/... (the container's view of its mounts),
DEST/env (NAME=VALUE lines the container gets) and DEST/secrets (one "NAME KEY PATH" line per Secret
the manifests expect to exist: CI makes stand-ins).
"""

import importlib
import pathlib
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = KUBERNETES / "overlays"
KUBERNETES_VERSION = "1.30.0"


def render(overlay: pathlib.Path) -> list[dict]:
    """The overlay's resources as `kubectl apply -k` would send them."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def check(doc: dict) -> None:
    """Raises when `doc` is not a valid resource of its kind."""
    group, _, version = doc["apiVersion"].rpartition("/")
    if group.endswith(".istio.io"):
        module = importlib.import_module(f"cloudcoil.models.istio.{group.split('.')[0]}.{version}")
        getattr(module, doc["kind"]).model_validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def validate() -> int:
    failures = 0
    sources = [
        (str(path.relative_to(DEPLOY.parent)), list(yaml.safe_load_all(path.read_text())))
        for path in sorted(KUBERNETES.rglob("*.yaml"))
        if path.name != "kustomization.yaml"
    ]
    sources += [(f"kubectl kustomize {o.relative_to(DEPLOY.parent)}", render(o)) for o in sorted(OVERLAYS.iterdir())]
    for source, docs in sources:
        for doc in filter(None, docs):
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                check(doc)
                print(f"ok      {source}: {name}")
            except Exception as error:  # every kind of validation failure is reported the same way
                failures += 1
                print(f"INVALID {source}: {name}: {error}")
    print(f"{sum(len(list(filter(None, d))) for _, d in sources) - failures} passed, {failures} failed")
    return 1 if failures else 0


def write(root: pathlib.Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def stage_overlay(overlay: str, dest: pathlib.Path) -> int:
    docs = render(OVERLAYS / overlay)
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
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
    for var in container.get("env", []):
        if "value" in var:
            env.append(f"{var['name']}={var['value']}")
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            secrets.append(f"{ref['name']} {ref['key']} env:{var['name']}")
    (dest / "env").write_text("".join(f"{line}\n" for line in env))
    (dest / "secrets").write_text("".join(f"{line}\n" for line in secrets))
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


def main(args: list[str]) -> int:
    match args:
        case ["validate"]:
            return validate()
        case ["stage-overlay", overlay, dest]:
            return stage_overlay(overlay, pathlib.Path(dest))
        case ["stage-compose", service, dest]:
            return stage_compose(service, pathlib.Path(dest))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
