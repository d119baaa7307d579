"""Ranking commands of the ``vitrine`` CLI: ``train-ranker`` and ``serve ranking``."""

from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from pathlib import Path

from shared.cli import Command, CommandRegistry, add_label_split_argument, add_server_arguments, server_overrides
from shared.logs import event

log = logging.getLogger(__name__)


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, help="dataset directory (required without --from-logs)")
    parser.add_argument("--out", type=Path, required=True, help="artifact root; writes <out>/ranker/<version>/")
    parser.add_argument(
        "--retrieval",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="a retrieval service serving an index built without the label events "
        "(build-index --without-ranker-labels, or --cutoff); required without --from-logs. The random "
        "label split has ranker_build.label_draws draws: repeat once per draw, in order, the i-th "
        "serving the index built with --label-draw i",
    )
    parser.add_argument(
        "--from-logs",
        type=Path,
        default=None,
        metavar="DIR",
        help="train on the impressions and events a ranking server captured (ranking.capture.directory) "
        "instead of replaying a dataset; items and history come from the current ranker in --out",
    )
    parser.add_argument(
        "--base-version",
        default=None,
        help="with --from-logs: the ranker version whose items and event snapshot the new one builds on "
        "(default: CURRENT)",
    )
    parser.add_argument(
        "--cutoff", type=int, default=None, help="label events are those from this unix time on (default: settings)"
    )
    add_label_split_argument(parser)


def _run_train_from_logs(args: argparse.Namespace) -> int:
    from ranking_service.training import train_ranker_from_logs
    from shared.config import load_settings

    settings = load_settings()
    artifact = train_ranker_from_logs(args.from_logs, args.out, settings.ranker_build, args.base_version)
    print(f"ranker {artifact.version}: {artifact.path}  {artifact.metrics}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    if args.from_logs is not None:
        return _run_train_from_logs(args)
    if args.data is None or args.retrieval is None:
        raise SystemExit("train-ranker: --data and --retrieval are required (or train with --from-logs DIR)")
    from ranking_service.retrieval_client import RetrievalClient
    from ranking_service.store import item_table
    from ranking_service.training import train_ranker_artifact
    from shared.config import load_settings
    from shared.data import load_dataset
    from shared.embeddings import cached_text_embedder

    settings = load_settings(ranker_build={"label_split": args.label_split})
    draws = settings.ranker_build.label_draw_count(args.cutoff)
    if len(args.retrieval) != draws:
        raise SystemExit(
            f"train-ranker: the {settings.ranker_build.label_split!r} label split has {draws} draw(s) "
            f"(ranker_build.label_draws applies to the random split); give --retrieval once per draw, "
            f"got {len(args.retrieval)}"
        )
    dataset = load_dataset(args.data)
    embedder = cached_text_embedder(settings.embedding, args.out / "embedding-cache")
    content = embedder.encode(dataset.catalog.embedding_texts(), show_progress=True)
    with ExitStack() as stack:
        clients = [RetrievalClient(target) for target in args.retrieval]
        for client in clients:
            stack.callback(client.close)
            client.wait_ready(30.0)
        artifact = train_ranker_artifact(
            dataset,
            clients,
            args.out,
            settings.ranker_build,
            settings.ranking,
            item_table(dataset, content),
            settings.index_build,
            args.cutoff,
        )
    print(f"ranker {artifact.version}: {artifact.path}  {artifact.metrics}")
    return 0


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, "ranker/CURRENT")
    parser.add_argument("--retrieval", default=None, help="HOST:PORT of the retrieval service")
    parser.add_argument(
        "--retrieval-shard",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="one shard of a sharded retrieval index (repeat once per shard; replaces --retrieval)",
    )


def _run_serve(args: argparse.Namespace) -> int:
    from ranking_service.scoring import wait_for_compiles
    from ranking_service.server import SERVICE_NAME, start_ranking_server
    from shared.config import load_settings
    from shared.grpc_server import serve_until_signalled, write_port_file
    from shared.tracing import configure_tracing

    settings = load_settings(
        ranking={
            **server_overrides(args),
            "retrieval_target": args.retrieval,
            "retrieval_shards": args.retrieval_shard,
        }
    )
    configure_tracing(settings.tracing, SERVICE_NAME)
    running = start_ranking_server(settings.ranking)
    write_port_file(args.port_file, running.port)
    serve_until_signalled(running)
    if not wait_for_compiles(settings.ranking.exit_compile_wait_s):
        event(log, "exiting during a ranker compile", level=logging.WARNING)
    return 0


def register(registry: CommandRegistry) -> None:
    registry.add(Command("train-ranker", "train the LightGBM ranker artifact", _configure_train, _run_train))
    registry.add_server(Command("ranking", "serve Recommend over gRPC", _configure_serve, _run_serve))
