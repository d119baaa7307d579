"""Shared CLI commands: ``datagen``, ``load`` (a public format -> a dataset), ``build`` (the
offline pipeline) and ``demo``.

``build`` and ``demo`` compose the services through their own CLI commands and gRPC,
never through their Python modules: the ranker is trained against a real retrieval
server process, just as it is served.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from shared.cli import Command, CommandRegistry, add_label_split_argument
from shared.config import load_settings

# For retrieval servers that only answer by user and history (the ranker's training replay,
# vitrine evaluate): without free-text queries they skip loading the text model, ~8 s
# per server on 2 cores (a random-split build starts one per label draw).
NO_TEXT_QUERIES: Mapping[str, str] = {"VITRINE_RETRIEVAL__TEXT_QUERIES": "false"}


def _configure_datagen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=3_000)
    parser.add_argument("--events", type=int, default=220_000)


def _run_datagen(args: argparse.Namespace) -> int:
    from shared.datagen import GeneratorConfig, write_default_dataset

    started = time.perf_counter()
    config = GeneratorConfig(seed=args.seed, n_items=args.items, n_users=args.users, n_events=args.events)
    dataset = write_default_dataset(args.out, config)
    print(f"dataset {args.out}: {dataset.counts()} in {time.perf_counter() - started:.1f}s")
    return 0


def vitrine_command(*args: str) -> list[str]:
    """Argv that runs the ``vitrine`` CLI with this interpreter."""
    return [sys.executable, "-m", "shared.cli", *args]


def start_server_process(
    argv: Sequence[str],
    port_file: Path,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    append_log: bool = True,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a ``vitrine serve ...`` process on free ports; return it and its port once it
    serves (it writes the port file then; ``timeout_s``, default supervisor.start_timeout_s).
    A process that exits or never serves is killed and reported with its log file."""
    if timeout_s is None:
        timeout_s = load_settings().supervisor.start_timeout_s
    port_file.unlink(missing_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab" if append_log else "wb") as log:
        process = subprocess.Popen(
            [*argv, "--port", "0", "--metrics-port", "0", "--port-file", str(port_file)],
            stdout=log,
            stderr=log,
            env={**os.environ, **env} if env else None,
        )
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}; see {log_file}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError(f"{' '.join(argv)} not serving after {timeout_s}s; see {log_file}")
        time.sleep(0.02)
    return process, int(port_file.read_text())


@contextlib.contextmanager
def server_process(
    argv: Sequence[str], port_file: Path, log_file: Path, env: Mapping[str, str] | None = None
) -> Iterator[int]:
    """Run a ``vitrine serve ...`` process; yield its port once serving; SIGTERM on exit.

    ``env`` adds to (or overrides) this process's environment, e.g. ``VITRINE_...`` settings.
    The waits come from this process's settings (``supervisor``; after SIGTERM, the
    server's own stop budget plus a margin: VitrineSettings.server_stop_budget_s).
    """
    settings = load_settings()
    process, port = start_server_process(argv, port_file, log_file, env, settings.supervisor.start_timeout_s)
    try:
        yield port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=settings.server_stop_budget_s + settings.supervisor.stop_margin_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    # Reached only when the body succeeded: the server must have drained and exited cleanly.
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode} on SIGTERM; see {log_file}")


def run_step(*argv: str) -> None:
    """Run another ``vitrine`` command in this process (through the command registry)."""
    from shared.cli import main

    code = main(list(argv))
    if code:
        raise RuntimeError(f"vitrine {' '.join(argv)} failed with exit code {code}")


def training_index_name(draw: int) -> str:
    """The training index of label draw ``draw`` (draw 0 keeps the historical name)."""
    return "index-train" if draw == 0 else f"index-train-draw-{draw}"


def run_build(data: Path, out: Path, label_split: str | None = None) -> None:
    """Training index (without the ranker's label events) -> ranker trained against it -> serving index.

    ``label_split`` overrides ``ranker_build.label_split`` for every step (it also says
    whether the item models fit sessions: ``ItemModelSettings.for_label_split``). The random split
    has ``ranker_build.label_draws`` draws: one training index and one retrieval server per
    draw, all serving while the ranker replays its requests. Only the serving index is split
    into ``index_build.shards`` shards: a training index lives for one step on this machine,
    and the merged answers of shards are the whole index's answers, so the ranker learns on
    what sharded serving returns.
    """
    settings = load_settings(ranker_build={"label_split": label_split})
    split = settings.ranker_build.label_split
    draws = settings.ranker_build.label_draw_count()
    split_flag = ("--label-split", split)
    names = [training_index_name(draw) for draw in range(draws)]
    print(f"[1/3] {draws} training index(es) without the ranker's label events ({split} split)", flush=True)
    for draw, name in enumerate(names):
        run_step(
            "build-index", "--data", str(data), "--out", str(out), "--name", name, "--without-ranker-labels",
            *split_flag, "--label-draw", str(draw), "--shards", "1",
        )  # fmt: skip
    print("[2/3] ranker trained on candidates from retrieval servers over those indexes", flush=True)
    run_dir = out / "logs"
    one_shard = ("--shard", "0", "--shards", "1")
    with contextlib.ExitStack() as servers:
        ports = [
            servers.enter_context(
                server_process(
                    vitrine_command("serve", "retrieval", "--artifacts", str(out), "--index-name", name, *one_shard),
                    run_dir / f"retrieval-{name}.port",
                    run_dir / f"retrieval-{name}.log",
                    env=NO_TEXT_QUERIES,
                )
            )
            for name in names
        ]
        targets = [flag for port in ports for flag in ("--retrieval", f"127.0.0.1:{port}")]
        run_step("train-ranker", "--data", str(data), "--out", str(out), *targets, *split_flag)
    shards = settings.index_build.shards
    print(f"[3/3] serving index from all events{f' in {shards} shards' if shards > 1 else ''}", flush=True)
    run_step("build-index", "--data", str(data), "--out", str(out), *split_flag)


def _configure_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset directory")
    parser.add_argument("--out", type=Path, required=True, help="artifact root")
    add_label_split_argument(parser)


def _run_build(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    run_build(args.data, args.out, args.label_split)
    print(f"artifacts in {args.out} after {time.perf_counter() - started:.0f}s")
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("var/demo"), help="data, artifacts and logs go here")
    parser.add_argument("--rebuild", action="store_true", help="regenerate data and artifacts")
    parser.add_argument("--users", type=int, default=3, help="how many known users to show")


def _run_demo(args: argparse.Namespace) -> int:
    from shared.demo import run_demo

    return run_demo(args.workdir, args.rebuild, args.users)


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path, required=True, help="artifact root")
    parser.add_argument(
        "--require", action="append", default=[], metavar="NAME", help="artifact that must exist (repeatable)"
    )


def _run_verify(args: argparse.Namespace) -> int:
    """Verify the CURRENT version of every artifact (checksums included); exit 1 if any fails."""
    from shared.artifacts import ArtifactError, open_current

    names = sorted({path.parent.name for path in args.artifacts.glob("*/CURRENT")} | set(args.require))
    failed = False
    for name in names:
        try:
            artifact = open_current(args.artifacts, name)
            kind = artifact.manifest["kind"]
            print(f"ok      {name}/{artifact.version} ({kind}, {len(artifact.manifest['files'])} files)")
        except (ArtifactError, OSError, KeyError, ValueError) as error:
            failed = True
            print(f"FAILED  {name}: {error}", file=sys.stderr)
    return 1 if failed or not names else 0


def _configure_health(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1", help="host to check (default: this machine)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help="health service name, e.g. vitrine.v1.Ranking")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--ca", type=Path, default=None, help="CA file: check over TLS")
    parser.add_argument("--cert", type=Path, default=None, help="client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, default=None, help="client key (mutual TLS)")
    parser.add_argument("--server-name", default=None, help="name the server certificate must carry")


def _run_health(args: argparse.Namespace) -> int:
    """A probe for plain and TLS servers alike (Kubernetes' native gRPC probe has no TLS)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from shared.security import ClientTlsSettings, open_channel

    tls = ClientTlsSettings(
        ca_file=args.ca, cert_file=args.cert, key_file=args.key, server_name_override=args.server_name
    )
    with open_channel(f"{args.address}:{args.port}", tls) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
                .status
            )
        except grpc.RpcError as error:
            print(f"{args.address}:{args.port} {args.service}: {error.code().name} {error.details()}", file=sys.stderr)
            return 1
    print(f"{args.address}:{args.port} {args.service}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _configure_load(parser: argparse.ArgumentParser) -> None:
    from shared.loaders import add_dataset_arguments

    add_dataset_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="Vitrine dataset directory to write")
    parser.add_argument("--name", default=None, help="dataset name recorded in dataset.json (default: from the source)")


def _run_load(args: argparse.Namespace) -> int:
    """Any supported source -> a Vitrine dataset directory that ``vitrine build`` reads."""
    import dataclasses

    from shared.data import save_dataset
    from shared.loaders import load_from_arguments

    started = time.perf_counter()
    result = load_from_arguments(args)
    print(result.report.summary())
    dataset = dataclasses.replace(result.dataset, name=args.name) if args.name else result.dataset
    save_dataset(dataset, args.out)
    print(f"dataset {args.out}: {dataset.counts()} in {time.perf_counter() - started:.1f}s")
    return 0


def _configure_evaluate(parser: argparse.ArgumentParser) -> None:
    from shared.evaluation.protocols import PROTOCOLS
    from shared.loaders import add_dataset_arguments

    add_dataset_arguments(parser)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="random", help="how train and test are split")
    parser.add_argument("--k", type=_list_length, default=10, help="list length the metrics are computed at (1..100)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the random split")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, plots")


def _list_length(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else -1
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: choose an integer from 1 to 100")
    return value


def _run_evaluate(args: argparse.Namespace) -> int:
    from shared.evaluation.report import GROUPS_TITLE, group_table, markdown_table
    from shared.evaluation.run import evaluate
    from shared.loaders import load_from_arguments

    loaded = load_from_arguments(args)
    print(loaded.report.summary(), flush=True)
    results = evaluate(loaded.dataset, args.protocol, args.k, args.seed, args.out)
    print(markdown_table(results))
    by_group = group_table(results)
    if by_group:
        print(f"\n{GROUPS_TITLE}:\n{by_group}")
    print(f"results in {args.out}/results.json, results.md and PNG plots")
    return 0


def register(registry: CommandRegistry) -> None:
    registry.add(Command("datagen", "generate the embedded retail dataset", _configure_datagen, _run_datagen))
    registry.add(Command("load", "convert a public dataset into a Vitrine dataset", _configure_load, _run_load))
    registry.add(Command("build", "run the offline pipeline: indexes and ranker", _configure_build, _run_build))
    registry.add(Command("demo", "generate, build, serve and show recommendations", _configure_demo, _run_demo))
    registry.add(Command("verify", "verify artifact manifests and checksums", _configure_verify, _run_verify))
    registry.add(Command("health", "check a server's gRPC health (exit 0 = SERVING)", _configure_health, _run_health))
    registry.add(
        Command("evaluate", "baselines and the pipeline on one split of real data", _configure_evaluate, _run_evaluate)
    )
