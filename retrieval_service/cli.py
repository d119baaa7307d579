"""Retrieval commands of the ``vitrine`` CLI: ``build-index`` and ``serve retrieval``."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.cli import Command, CommandRegistry, add_server_arguments, server_overrides


def _configure_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset directory (vitrine datagen --out)")
    parser.add_argument("--out", type=Path, required=True, help="artifact root; writes <out>/<name>/<version>/")
    parser.add_argument("--name", default="index", help="artifact name (default: index)")
    parser.add_argument("--cutoff", type=int, default=None, help="use only events before this unix time")
    parser.add_argument(
        "--content-weight", type=float, default=None, help="weight of the text half (0: collaborative only)"
    )
    parser.add_argument(
        "--collaborative-weight", type=float, default=None, help="weight of the ALS half (0: content only)"
    )


def _run_build(args: argparse.Namespace) -> int:
    from retrieval_service.artifact import build_index_artifact
    from shared.config import load_settings
    from shared.data import load_dataset
    from shared.embeddings import cached_text_embedder

    settings = load_settings(
        index_build={"content_weight": args.content_weight, "collaborative_weight": args.collaborative_weight}
    )
    dataset = load_dataset(args.data)
    embedder = cached_text_embedder(settings.embedding, args.out / "embedding-cache")
    artifact = build_index_artifact(dataset, embedder, args.out, settings.index_build, args.name, args.cutoff)
    print(f"index {artifact.version}: {artifact.path}  {artifact.metrics}")
    return 0


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, "index/CURRENT")
    parser.add_argument("--index-name", default=None, help="artifact name to serve (default: index)")


def _run_serve(args: argparse.Namespace) -> int:
    from retrieval_service.server import SERVICE_NAME, start_retrieval_server
    from shared.config import load_settings
    from shared.grpc_server import serve_until_signalled, write_port_file
    from shared.tracing import configure_tracing

    settings = load_settings(retrieval={**server_overrides(args), "index_name": args.index_name})
    configure_tracing(settings.tracing, SERVICE_NAME)
    running = start_retrieval_server(settings.retrieval, settings.embedding)
    write_port_file(args.port_file, running.port)
    serve_until_signalled(running)
    return 0


def register(registry: CommandRegistry) -> None:
    registry.add(Command("build-index", "build the retrieval index artifact", _configure_build, _run_build))
    registry.add_server(Command("retrieval", "serve Retrieve/SimilarItems over gRPC", _configure_serve, _run_serve))
