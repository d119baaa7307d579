"""``make loadtest``: small artifacts, both services as processes on loopback, every scenario.

The dataset, the artifacts and the server processes come from the same code as
``vitrine demo`` (``write_default_dataset``, ``run_build``, ``server_process``); only
the sizes are smaller, so the whole run takes a minute or two. Data and artifacts are
kept in the work directory and reused by the next run.
"""

from __future__ import annotations

import shutil
import time

from deploy.loadtest.ids import ids_from_artifacts, write_ids
from deploy.loadtest.results import LoadTestReport
from deploy.loadtest.runner import RANKING_SERVICE, RETRIEVAL_SERVICE, run_scenarios, wait_serving
from deploy.loadtest.settings import LoadTestSettings
from shared.commands import run_build, server_process, vitrine_command
from shared.security import ClientTlsSettings


def prepare_artifacts(settings: LoadTestSettings, rebuild: bool = False) -> None:
    """Generate the dataset and build the artifacts unless the work directory has them."""
    local = settings.local
    data, artifacts = local.workdir / "data", local.workdir / "artifacts"
    if rebuild:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(artifacts, ignore_errors=True)
    if not (data / "dataset.json").is_file():
        from shared.datagen import GeneratorConfig, write_default_dataset

        print(f"== generating a {local.items}-item dataset into {data}", flush=True)
        config = GeneratorConfig(seed=local.seed, n_items=local.items, n_users=local.users, n_events=local.events)
        write_default_dataset(data, config)
        shutil.rmtree(artifacts, ignore_errors=True)  # built from other data
    if not ((artifacts / "index" / "CURRENT").is_file() and (artifacts / "ranker" / "CURRENT").is_file()):
        print(f"== building artifacts into {artifacts}", flush=True)
        run_build(data, artifacts)


def run_local(settings: LoadTestSettings, command: str, rebuild: bool = False) -> LoadTestReport:
    started = time.perf_counter()
    local = settings.local
    prepare_artifacts(settings, rebuild)
    data, artifacts = local.workdir / "data", local.workdir / "artifacts"
    ids_file = settings.run_dir / "ids.json"
    ids = ids_from_artifacts(artifacts, data, settings.session_items)
    write_ids(ids, ids_file)
    print(f"== {len(ids.users)} users and {len(ids.items)} items from the served index", flush=True)
    server_env = {"VITRINE_RETRIEVAL__TEXT_QUERIES": str(local.text_queries).lower()}
    logs = settings.run_dir
    with (
        server_process(
            vitrine_command("serve", "retrieval", "--artifacts", str(artifacts)),
            logs / "retrieval.port",
            logs / "retrieval.log",
            env=server_env,
        ) as retrieval_port,
        server_process(
            vitrine_command(
                "serve", "ranking", "--artifacts", str(artifacts), "--retrieval", f"127.0.0.1:{retrieval_port}"
            ),
            logs / "ranking.port",
            logs / "ranking.log",
        ) as ranking_port,
    ):
        ranking, retrieval = f"127.0.0.1:{ranking_port}", f"127.0.0.1:{retrieval_port}"
        wait_serving(retrieval, RETRIEVAL_SERVICE, ClientTlsSettings(), local.server_start_timeout_s)
        wait_serving(ranking, RANKING_SERVICE, ClientTlsSettings(), local.server_start_timeout_s)
        print(f"== retrieval on {retrieval}, ranking on {ranking}: SERVING", flush=True)
        # Plaintext, no token: these are the local servers, whatever the settings say about a cluster.
        targeted = settings.model_copy(
            update={
                "target": ranking,
                "retrieval_target": retrieval,
                "ids_file": ids_file.resolve(),
                "tls": ClientTlsSettings(),
                "retrieval_tls": None,
                "system_roots": False,
                "token": None,
                "retrieval_token": None,
            }
        )
        setup = (
            f"Both services as processes on loopback with default settings, on the same machine as the load "
            f"generator (one locust process); generated catalogue of {local.items} items, {local.users} users, "
            f"{local.events} events; requests for {len(ids.users)} real users ({settings.unknown_user_share:.0%} "
            f"unknown, cold start) and {len(ids.items)} real items, k={settings.k}, "
            f"SimilarItems n={settings.similar_n}, deadline {settings.timeout_s:g} s. "
            "Latency percentiles are of successful calls, after a warm-up; ramp stages double closed-loop clients."
        )
        report = run_scenarios(targeted, command, setup, progress=lambda line: print(f"== {line}", flush=True))
    print(f"== services stopped; load test took {time.perf_counter() - started:.0f}s (logs in {logs})", flush=True)
    return report
