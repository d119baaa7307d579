"""Deployment material, validated offline: Kustomize renders, the objects pass the
Kubernetes schemas (--strict) and checkov, the Dockerfile passes hadolint, and the
manifests agree with the code (ports, probes, service names, settings, commands)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ranking_service.server import SERVICE_NAME as RANKING_SERVICE
from retrieval_service.server import SERVICE_NAME as RETRIEVAL_SERVICE
from retrieval_service.shards import shard_artifact_name
from shared.artifacts import current_version
from shared.cli import load_registry
from shared.commands import vitrine_command
from shared.config import RankingSettings, VitrineSettings, load_settings
from tests.conftest import BuiltArtifacts, Servers

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Every overlay an operator may apply: the unsharded dev and prod, and prod over a sharded index.
OVERLAYS = ("dev", "prod", "prod-sharded")
BIN = Path(sys.executable).parent
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
# app.kubernetes.io/component of each workload -> settings section and gRPC service name.
COMPONENTS = {"retrieval": ("retrieval", RETRIEVAL_SERVICE), "ranking": ("ranking", RANKING_SERVICE)}
DNS_SCHEME = "dns:///"


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False, env=env)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    completed = _run("kubectl", "kustomize", DEPLOY / "k8s" / "overlays" / request.param)
    assert completed.returncode == 0, completed.stderr
    out.write_text(completed.stdout)
    return request.param, out


def _objects(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def _workloads(objects: list[dict[str, Any]], component: str) -> dict[str, dict[str, Any]]:
    """The Deployments of one component (retrieval: one per shard), by name."""
    return {
        name: deployment
        for name, deployment in _by_kind(objects, "Deployment").items()
        if deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    }


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _pods_selected(objects: list[dict[str, Any]], selector: dict[str, str]) -> set[str]:
    """Names of the Deployments whose pods ``selector`` (matchLabels) selects."""
    return {
        name
        for name, deployment in _by_kind(objects, "Deployment").items()
        if _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
    }


def _config_file(objects: list[dict[str, Any]], tmp_path: Path) -> Path:
    config = tmp_path / "vitrine.yaml"
    config.write_text(_by_kind(objects, "ConfigMap")["vitrine-config"]["data"]["vitrine.yaml"])
    return config


def _settings_of(deployment: dict[str, Any], config: Path) -> VitrineSettings:
    """The settings the container of ``deployment`` starts with: the ConfigMap file plus its env."""
    with pytest.MonkeyPatch.context() as patch:
        for name in os.environ:
            if name.startswith("VITRINE_"):
                patch.delenv(name)
        patch.setenv("VITRINE_CONFIG", str(config))
        for variable in deployment["spec"]["template"]["spec"]["containers"][0].get("env", []):
            if variable["name"].startswith("VITRINE_") and variable["name"] != "VITRINE_CONFIG":
                # Secrets are injected at run time; any well-formed token stands in for them.
                patch.setenv(variable["name"], variable.get("value", "secret-from-kubernetes-0123456789"))
        return load_settings()


def _host_port(target: str) -> tuple[str, int]:
    """``dns:///name:port`` (or ``name:port``) -> (name, port)."""
    host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
    return host, int(port)


def test_manifests_pass_the_kubernetes_schemas_strictly(rendered: tuple[str, Path]) -> None:
    _, path = rendered
    completed = _run(BIN / "kubernetes-validate", "--strict", "--quiet", path)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_manifests_and_dockerfile_pass_checkov(rendered: tuple[str, Path]) -> None:
    _, path = rendered
    assert CHECKOV.exists(), "make test installs checkov into .venv-tools (make tools)"
    completed = _run(
        CHECKOV, "--framework", "kubernetes", "dockerfile", "--skip-download", "--quiet", "--compact",
        "--config-file", DEPLOY / "checkov.yaml", "-f", path, "-f", DEPLOY / "docker" / "Dockerfile",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-4000:]


def test_dockerfile_passes_hadolint() -> None:
    completed = _run(BIN / "hadolint", DEPLOY / "docker" / "Dockerfile")
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_expected_objects_exist(rendered: tuple[str, Path]) -> None:
    """Each replica set (ranking; retrieval, or each retrieval shard) has its Service, HPA and PDB."""
    overlay, path = rendered
    objects = _objects(path)
    retrieval = _workloads(objects, "retrieval")
    ranking = _workloads(objects, "ranking")
    assert set(ranking) == {"vitrine-ranking"}
    if overlay.endswith("sharded"):
        assert set(retrieval) == {f"vitrine-retrieval-shard-{shard}" for shard in range(len(retrieval))}
        assert len(retrieval) > 1
    else:
        assert set(retrieval) == {"vitrine-retrieval"}
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert set(_by_kind(objects, kind)) == set(retrieval) | set(ranking), kind
    assert set(_by_kind(objects, "Service")) == set(retrieval) | set(ranking) | {"vitrine-redis"}
    assert set(_by_kind(objects, "StatefulSet")) == {"vitrine-redis"}
    assert set(_by_kind(objects, "NetworkPolicy")) == {"vitrine-retrieval", "vitrine-ranking", "vitrine-redis"}
    assert "vitrine-config" in _by_kind(objects, "ConfigMap")
    for name in retrieval:
        assert _by_kind(objects, "Service")[name]["spec"]["clusterIP"] == "None"  # headless
    assert _by_kind(objects, "Service")["vitrine-ranking"]["spec"]["type"] == "ClusterIP"


def test_each_replica_set_is_scaled_and_protected_on_its_own(rendered: tuple[str, Path]) -> None:
    """Service, PDB and spread select exactly one Deployment's pods; the HPA scales that one.

    With shards this is what keeps a node drain or a scale-down from taking the last
    replica of one shard while the others have plenty.
    """
    objects = _objects(rendered[1])
    for name, deployment in _by_kind(objects, "Deployment").items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _pods_selected(objects, selector) == {name}
        assert _pods_selected(objects, _by_kind(objects, "Service")[name]["spec"]["selector"]) == {name}
        assert _pods_selected(
            objects, _by_kind(objects, "PodDisruptionBudget")[name]["spec"]["selector"]["matchLabels"]
        ) == {name}
        target = _by_kind(objects, "HorizontalPodAutoscaler")[name]["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
            assert spread["labelSelector"]["matchLabels"] == selector


def test_retrieval_targets_and_shards_match_the_code(rendered: tuple[str, Path], tmp_path: Path) -> None:
    """Ranking's retrieval targets name the headless Services of the retrieval replica sets,
    target i reaches the pods that serve shard i of as many shards as there are targets,
    and each of them verifies the artifact it will serve before it starts."""
    overlay, path = rendered
    objects = _objects(path)
    config = _config_file(objects, tmp_path)
    ranking = _settings_of(_by_kind(objects, "Deployment")["vitrine-ranking"], config).ranking
    assert ranking.retrieval_lb_policy == "round_robin"
    targets = ranking.retrieval_shards or [ranking.retrieval_target]
    assert bool(ranking.retrieval_shards) == overlay.endswith("sharded")
    retrieval = _workloads(objects, "retrieval")
    assert len(targets) == len(retrieval)
    served = set()
    for position, target in enumerate(targets):
        assert target.startswith(DNS_SCHEME), "round_robin over pods needs the dns resolver"
        host, port = _host_port(target)
        service = _by_kind(objects, "Service")[host]
        assert service["spec"]["clusterIP"] == "None"
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == port
        (name,) = _pods_selected(objects, service["spec"]["selector"])
        settings = _settings_of(retrieval[name], config).retrieval
        assert settings.port == port
        assert (settings.shard, settings.shards) == (position, len(targets))
        pod = retrieval[name]["spec"]["template"]["spec"]
        verify = pod["initContainers"][0]["command"]
        required = verify[verify.index("--require") + 1]
        assert required == shard_artifact_name(settings.index_name, settings.shard, settings.shards)
        served.add(name)
    assert served == set(retrieval)


def test_configmap_and_env_are_valid_settings(rendered: tuple[str, Path], tmp_path: Path) -> None:
    objects = _objects(rendered[1])
    config = _config_file(objects, tmp_path)
    for deployment in _by_kind(objects, "Deployment").values():
        _settings_of(deployment, config)  # raises SettingsError on anything invalid


def test_ports_probes_and_grace_match_the_code(rendered: tuple[str, Path], tmp_path: Path) -> None:
    overlay, path = rendered
    objects = _objects(path)
    config = _config_file(objects, tmp_path)
    registry = load_registry()
    for component, (section, service_name) in COMPONENTS.items():
        for name, deployment in _workloads(objects, component).items():
            server = getattr(_settings_of(deployment, config), section)
            pod = deployment["spec"]["template"]
            container = pod["spec"]["containers"][0]
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            assert ports == {"grpc": server.port, "metrics": server.metrics_port}
            assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(server.metrics_port)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = container[probe]
                if "grpc" in spec:
                    assert spec["grpc"] == {"port": server.port, "service": service_name}
                else:
                    command = spec["exec"]["command"]
                    assert command[:2] == ["vitrine", "health"]
                    assert "health" in registry.commands
                    assert command[command.index("--port") + 1] == str(server.port)
                    assert command[command.index("--service") + 1] == service_name
            assert not overlay.startswith("prod") or "exec" in container["readinessProbe"], "TLS needs the exec probe"
            pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            # Ranking also waits for a running compile of its trees before it exits.
            compile_wait = server.exit_compile_wait_s if isinstance(server, RankingSettings) else 0.0
            assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + server.grace_period_s + compile_wait
            init = pod["spec"]["initContainers"][0]["command"]
            assert init[:2] == ["vitrine", "verify"]
            assert "verify" in registry.commands
            service = _by_kind(objects, "Service")[name]
            assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_only_ranking_reaches_retrieval(rendered: tuple[str, Path], tmp_path: Path) -> None:
    """Every retrieval pod (every shard's) is behind the policy that admits only ranking."""
    objects = _objects(rendered[1])
    settings = _settings_of(_by_kind(objects, "Deployment")["vitrine-ranking"], _config_file(objects, tmp_path))
    policy = _by_kind(objects, "NetworkPolicy")["vitrine-retrieval"]["spec"]
    assert _pods_selected(objects, policy["podSelector"]["matchLabels"]) == set(_workloads(objects, "retrieval"))
    grpc_rule = policy["ingress"][0]
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "vitrine-ranking"}}}]
    assert _pods_selected(objects, grpc_rule["from"][0]["podSelector"]["matchLabels"]) == {"vitrine-ranking"}
    assert grpc_rule["ports"] == [{"port": settings.retrieval.port, "protocol": "TCP"}]


def test_replicas_share_online_state_and_catalogue_updates_in_redis(rendered: tuple[str, Path], tmp_path: Path) -> None:
    """Several ranking pods: LogEvents on one must be seen by Recommend on another; several
    retrieval pods: UpsertItems on one must reach the others. Both live in the Redis of
    redis.yaml (durable), and only the services (and the build) reach it."""
    objects = _objects(rendered[1])
    config = _config_file(objects, tmp_path)
    ranking = _settings_of(_by_kind(objects, "Deployment")["vitrine-ranking"], config)
    retrieval_workloads = _workloads(objects, "retrieval")
    retrieval = [_settings_of(_by_kind(objects, "Deployment")[name], config) for name in retrieval_workloads]
    service = _by_kind(objects, "Service")["vitrine-redis"]["spec"]
    redis_address = ("vitrine-redis", service["ports"][0]["port"])
    assert ranking.ranking.online_state.backend == "redis"
    assert _redis_address(ranking.ranking.online_state.redis_url) == redis_address
    for settings in retrieval:
        assert settings.retrieval.updates.log == "redis"
        assert _redis_address(settings.retrieval.updates.redis.redis_url) == redis_address
    redis = _by_kind(objects, "StatefulSet")["vitrine-redis"]["spec"]
    pod_labels = redis["template"]["metadata"]["labels"]
    assert _selects(service["selector"], pod_labels)
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    policy = _by_kind(objects, "NetworkPolicy")["vitrine-redis"]["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], pod_labels)
    (rule,) = policy["ingress"]
    admitted = {
        name for source in rule["from"] for name in _pods_selected(objects, source["podSelector"]["matchLabels"])
    }
    assert admitted == {"vitrine-ranking", *retrieval_workloads}
    assert {"app.kubernetes.io/name": "vitrine-build"} in [
        source["podSelector"]["matchLabels"] for source in rule["from"]
    ]
    assert rule["ports"] == [{"port": service["ports"][0]["port"], "protocol": "TCP"}]


def _redis_address(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def test_dockerfile_targets_run_registered_commands() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    registry = load_registry()
    assert 'ENTRYPOINT ["vitrine", "serve", "retrieval"]' in dockerfile
    assert 'ENTRYPOINT ["vitrine", "serve", "ranking"]' in dockerfile
    assert {"retrieval", "ranking"} <= set(registry.servers)
    settings = load_settings()
    assert f"EXPOSE {settings.retrieval.port} {settings.retrieval.metrics_port}" in dockerfile
    assert f"EXPOSE {settings.ranking.port} {settings.ranking.metrics_port}" in dockerfile
    assert "USER 10001:10001" in dockerfile
    assert os.path.exists(DEPLOY / "docker" / "Dockerfile.dockerignore")


def test_make_image_names_what_is_missing_when_no_engine_can_build(tmp_path: Path) -> None:
    """`make image` was asked for an image: with no working engine it fails and says why."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    docker = fake_bin / "docker"
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "CONTAINER_ENGINE": "docker"}
    completed = _run(DEPLOY / "docker" / "build-images.sh", env=env)
    assert completed.returncode != 0
    assert "docker is installed but its daemon does not answer" in completed.stderr
    assert "install podman" in completed.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert "deploy/docker/build-images.sh" in makefile


def test_verify_command_accepts_good_artifacts_and_refuses_damaged_ones(
    artifacts: BuiltArtifacts, tmp_path: Path
) -> None:
    """The init container's check: exit 0 only when every CURRENT version verifies."""
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts.root, root)
    good = _run(*vitrine_command("verify", "--artifacts", str(root)))
    assert good.returncode == 0, good.stderr
    assert {line.split()[1].split("/")[0] for line in good.stdout.splitlines()} == {"index", "index-train", "ranker"}

    missing = _run(*vitrine_command("verify", "--artifacts", str(root), "--require", "segments"))
    assert missing.returncode == 1
    assert "FAILED  segments" in missing.stderr

    index = root / "index" / current_version(root, "index")
    with (index / "index.faiss").open("ab") as damaged:
        damaged.write(b"\0")
    refused = _run(*vitrine_command("verify", "--artifacts", str(root)))
    assert refused.returncode == 1
    assert "FAILED  index" in refused.stderr
    assert "index.faiss" in refused.stderr
    assert "ok      ranker/" in refused.stdout


def test_health_command_reports_serving_and_failures(servers: Servers) -> None:
    """The probe the prod overlay runs: exit 0 only for SERVING, a reason otherwise."""
    port = str(servers.retrieval_server.port)
    serving = _run(*vitrine_command("health", "--port", port, "--service", RETRIEVAL_SERVICE))
    assert serving.returncode == 0, serving.stderr
    assert serving.stdout.strip().endswith("SERVING")

    unknown = _run(*vitrine_command("health", "--port", port, "--service", "no.such.Service"))
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = str(probe.getsockname()[1])
    down = _run(*vitrine_command("health", "--port", dead_port, "--timeout", "1"))
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr
