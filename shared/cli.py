"""The ``vitrine`` command line.

Commands come from plugins: each service registers its own (``vitrine.commands``
entry points in pyproject.toml), so this module never imports a service. Shared
commands (datagen, build, demo) are registered here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from shared.artifacts import ArtifactError
from shared.config import SettingsError
from shared.data import DatasetError
from shared.embeddings import EmbeddingError
from shared.logs import configure_logging
from shared.security import SecurityConfigError

ENTRY_POINT_GROUP = "vitrine.commands"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CommandRegistry:
    """Commands by name; servers are grouped under ``vitrine serve <name>``."""

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}
        self.servers: dict[str, Command] = {}

    def add(self, command: Command) -> None:
        if command.name in self.commands:
            raise ValueError(f"command {command.name!r} registered twice")
        self.commands[command.name] = command

    def add_server(self, command: Command) -> None:
        if command.name in self.servers:
            raise ValueError(f"server {command.name!r} registered twice")
        self.servers[command.name] = command


def add_server_arguments(parser: argparse.ArgumentParser, artifact_hint: str) -> None:
    """Flags every ``vitrine serve`` command takes; unset flags leave the settings alone."""
    parser.add_argument("--artifacts", type=Path, default=None, help=f"artifact root holding {artifact_hint}")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (0 picks a free one)")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (0: a free one)")


def add_label_split_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label-split",
        choices=("global", "per_user", "random"),
        default=None,
        help="which events the ranker learns to predict (default: ranker_build.label_split; see docs/evaluation.md)",
    )


def server_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {"artifacts": args.artifacts, "host": args.host, "port": args.port, "metrics_port": args.metrics_port}


def load_registry() -> CommandRegistry:
    from shared import commands

    registry = CommandRegistry()
    commands.register(registry)
    for plugin in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        plugin.load()(registry)
    return registry


def build_parser(registry: CommandRegistry) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrine", description="Vitrine hybrid recommendation engine")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: settings.log_level)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in registry.commands.values():
        command_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(command_parser)
        command_parser.set_defaults(run=command.run)
    serve = sub.add_parser("serve", help="run a gRPC server", description="Run one of Vitrine's gRPC servers.")
    servers = serve.add_subparsers(dest="server", required=True, metavar="SERVER")
    for server in registry.servers.values():
        server_parser = servers.add_parser(server.name, help=server.help, description=server.help)
        server.configure(server_parser)
        server_parser.set_defaults(run=server.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    registry = load_registry()
    args = build_parser(registry).parse_args(argv)
    try:
        from shared.config import load_settings

        configure_logging(args.log_level or load_settings().log_level)
        code: int = args.run(args)
        return code
    except (SettingsError, ArtifactError, DatasetError, EmbeddingError, SecurityConfigError, OSError) as error:
        # A user-fixable problem: say what is wrong, no traceback.
        print(f"vitrine: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
