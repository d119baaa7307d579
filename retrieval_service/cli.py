"""Retrieval commands of the ``vitrine`` CLI: ``build-index`` and ``serve retrieval``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from shared.cli import Command, CommandRegistry, add_label_split_argument, add_server_arguments, server_overrides


def _configure_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset directory (vitrine datagen --out)")
    parser.add_argument("--out", type=Path, required=True, help="artifact root; writes <out>/<name>/<version>/")
    parser.add_argument("--name", default="index", help="artifact name (default: index)")
    parser.add_argument("--cutoff", type=int, default=None, help="use only events before this unix time")
    parser.add_argument(
        "--without-ranker-labels",
        action="store_true",
        help="leave out the events the ranker learns to predict (see --label-split): the training index",
    )
    add_label_split_argument(parser)
    parser.add_argument(
        "--label-draw",
        type=int,
        default=0,
        help="with --without-ranker-labels and the random split: leave out the labels of this draw "
        "(0 .. ranker_build.label_draws - 1); one training index per draw",
    )
    parser.add_argument(
        "--content-weight", type=float, default=None, help="weight of the text half (0: collaborative only)"
    )
    parser.add_argument(
        "--collaborative-weight", type=float, default=None, help="weight of the ALS half (0: content only)"
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="split into this many shard artifacts <name>-shard-<i>-of-<n> (default: index_build.shards)",
    )


def _run_build(args: argparse.Namespace) -> int:
    from retrieval_service.artifact import build_index_artifacts
    from retrieval_service.shards import shard_artifact_name
    from retrieval_service.update_log import update_log_store
    from retrieval_service.updates import fold_into_dataset
    from shared.config import load_settings
    from shared.data import load_dataset
    from shared.embeddings import cached_text_embedder
    from shared.interactions import ranker_label_mask

    settings = load_settings(
        ranker_build={"label_split": args.label_split},
        index_build={
            "content_weight": args.content_weight,
            "collaborative_weight": args.collaborative_weight,
            "shards": args.shards,
        },
    )
    build = settings.ranker_build
    # Sessions and popularity's decay only for the tasks they help (the ranker's label split).
    index_build = settings.index_build.for_label_split(build.label_split)
    if args.label_draw and not args.without_ranker_labels:
        raise SystemExit("build-index: --label-draw needs --without-ranker-labels")
    if not 0 <= args.label_draw < build.label_draw_count():
        raise SystemExit(
            f"build-index: --label-draw {args.label_draw} is out of range: the {build.label_split!r} label split "
            f"has {build.label_draw_count()} draw(s) (ranker_build.label_draws applies to the random split)"
        )
    dataset = load_dataset(args.data)
    if args.without_ranker_labels:
        labels = ranker_label_mask(dataset.events, build.label_split, build.label_window, build.seed, args.label_draw)
        dataset = dataclasses.replace(dataset, events=dataset.events.select(~labels))
    # Catalogue changes made on the serving index (UpsertItems...) are folded in first;
    # the manifest records how far, so the server carries over only what came later.
    shards = index_build.shards
    update_logs = update_log_store(settings.retrieval.updates, args.out)
    try:
        folded = fold_into_dataset(
            dataset, args.out, update_logs, [shard_artifact_name(args.name, shard, shards) for shard in range(shards)]
        )
    finally:
        update_logs.close()
    embedder = cached_text_embedder(settings.embedding, args.out / "embedding-cache")
    for artifact in build_index_artifacts(
        folded.dataset,
        embedder,
        args.out,
        index_build,
        args.name,
        args.cutoff,
        shards,
        extra_params=folded.params,
    ):
        print(f"{artifact.name} {artifact.version}: {artifact.path}  {artifact.metrics}")
    return 0


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, "index/CURRENT")
    parser.add_argument("--index-name", default=None, help="artifact name to serve (default: index)")
    parser.add_argument("--shard", type=int, default=None, help="serve this shard of a sharded index (0-based)")
    parser.add_argument("--shards", type=int, default=None, help="how many shards the index was built with")


def _run_serve(args: argparse.Namespace) -> int:
    from retrieval_service.server import SERVICE_NAME, start_retrieval_server
    from shared.config import load_settings
    from shared.grpc_server import serve_until_signalled, write_port_file
    from shared.tracing import configure_tracing

    settings = load_settings(
        retrieval={**server_overrides(args), "index_name": args.index_name, "shard": args.shard, "shards": args.shards}
    )
    configure_tracing(settings.tracing, SERVICE_NAME)
    running = start_retrieval_server(settings.retrieval, settings.embedding)
    write_port_file(args.port_file, running.port)
    serve_until_signalled(running)
    return 0


def _configure_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--items", type=int, nargs="+", default=[25_000, 100_000, 400_000], help="shard sizes to measure"
    )
    parser.add_argument("--dimension", type=int, default=448, help="fused vector dimension (default: 384 text + 64)")
    parser.add_argument("--queries", type=int, default=300, help="timed history queries per size")
    parser.add_argument("--candidates", type=int, default=300, help="n per query (ranking asks for 300)")


def _run_size(args: argparse.Namespace) -> int:
    from retrieval_service.sizing import measure_shard, table
    from shared.config import DEFAULT_NPROBE, load_settings

    settings = load_settings()
    nprobe = settings.retrieval.nprobe or DEFAULT_NPROBE
    figures = []
    for n_items in args.items:
        figures.append(
            measure_shard(n_items, args.dimension, settings.index_build, args.queries, args.candidates, nprobe)
        )
        print(figures[-1], flush=True)
    print(table(figures))
    return 0


def register(registry: CommandRegistry) -> None:
    registry.add(Command("build-index", "build the retrieval index artifact", _configure_build, _run_build))
    registry.add(
        Command("size-shards", "measure memory and latency of index shards by size", _configure_size, _run_size)
    )
    registry.add_server(Command("retrieval", "serve Retrieve/SimilarItems over gRPC", _configure_serve, _run_serve))
