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

import pytest
import yaml

from ranking_service.server import SERVICE_NAME as RANKING_SERVICE
from retrieval_service.server import SERVICE_NAME as RETRIEVAL_SERVICE
from shared.artifacts import current_version
from shared.cli import load_registry
from shared.commands import vitrine_command
from shared.config import load_settings
from tests.conftest import BuiltArtifacts, Servers

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod")
BIN = Path(sys.executable).parent
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
SERVICES = {"vitrine-retrieval": ("retrieval", RETRIEVAL_SERVICE), "vitrine-ranking": ("ranking", RANKING_SERVICE)}


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False)


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
    objects = _objects(rendered[1])
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"):
        assert set(_by_kind(objects, kind)) == set(SERVICES), kind
    assert "vitrine-config" in _by_kind(objects, "ConfigMap")
    assert _by_kind(objects, "Service")["vitrine-retrieval"]["spec"]["clusterIP"] == "None"  # headless
    assert _by_kind(objects, "Service")["vitrine-ranking"]["spec"]["type"] == "ClusterIP"


def _config_file(objects: list[dict[str, Any]], tmp_path: Path) -> Path:
    config = tmp_path / "vitrine.yaml"
    config.write_text(_by_kind(objects, "ConfigMap")["vitrine-config"]["data"]["vitrine.yaml"])
    return config


def test_configmap_and_env_are_valid_settings(
    rendered: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = _objects(rendered[1])
    monkeypatch.setenv("VITRINE_CONFIG", str(_config_file(objects, tmp_path)))
    for deployment in _by_kind(objects, "Deployment").values():
        for variable in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
            if variable["name"].startswith("VITRINE_") and variable["name"] != "VITRINE_CONFIG":
                # Secrets are injected at run time; any well-formed token stands in for them.
                monkeypatch.setenv(variable["name"], variable.get("value", "secret-from-kubernetes-0123456789"))
    settings = load_settings()
    assert settings.ranking.retrieval_target.split("///")[-1].split(":")[0] == "vitrine-retrieval"
    assert settings.ranking.retrieval_lb_policy == "round_robin"


def test_ports_probes_and_grace_match_the_code(
    rendered: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay, path = rendered
    objects = _objects(path)
    monkeypatch.setenv("VITRINE_CONFIG", str(_config_file(objects, tmp_path)))
    settings = load_settings()
    registry = load_registry()
    for name, (section, service_name) in SERVICES.items():
        server = getattr(settings, section)
        pod = _by_kind(objects, "Deployment")[name]["spec"]["template"]
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
        assert overlay != "prod" or "exec" in container["readinessProbe"], "TLS in prod needs the exec probe"
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["spec"]["terminationGracePeriodSeconds"] > server.grace_period_s + pre_stop
        init = pod["spec"]["initContainers"][0]["command"]
        assert init[:2] == ["vitrine", "verify"]
        assert "verify" in registry.commands
        service = _by_kind(objects, "Service")[name]
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    policy = _by_kind(objects, "NetworkPolicy")["vitrine-retrieval"]["spec"]["ingress"][0]
    assert policy["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "vitrine-ranking"}}}]
    assert policy["ports"] == [{"port": settings.retrieval.port, "protocol": "TCP"}]


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
