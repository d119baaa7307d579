"""``python -m deploy.loadtest``: ``local`` (what ``make loadtest`` runs), ``run`` against any
target (a cluster), ``ids`` to extract real ids from an artifact directory.

Flags override the settings (deploy/loadtest/settings.py), which read
``VITRINE_LOADTEST_*`` environment variables and the YAML file in
``VITRINE_LOADTEST_CONFIG``. Tokens are never flags (they would show in ``ps``): use
``VITRINE_LOADTEST_TOKEN`` or ``--token-file``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.loadtest.runner import LoadTestError
from deploy.loadtest.settings import LoadTestSettings, LoadTestSettingsError, load_loadtest_settings
from shared.artifacts import ArtifactError
from shared.logs import configure_logging
from shared.security import SecurityConfigError


def _add_scenario_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scenarios (override the settings)")
    group.add_argument("--scenario", action="append", default=None, metavar="NAME", help="run only this (repeatable)")
    group.add_argument("--users", type=int, default=None, help="steady scenarios: concurrent clients")
    group.add_argument("--rate", type=float, default=None, help="steady scenarios: target requests/s in total")
    group.add_argument("--duration", type=float, default=None, help="steady scenarios: seconds")
    group.add_argument("--stages", default=None, help="ramp scenarios: client counts, e.g. 1,2,4,8,16,32")
    group.add_argument("--stage-seconds", type=float, default=None, help="ramp scenarios: seconds per stage")
    group.add_argument("--timeout", type=float, default=None, help="per-call deadline, seconds")
    group.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/loadtest.json)")
    group.add_argument("--command-label", default=None, help="the command recorded in the results")


def _configure_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    local = sub.add_parser("local", help="build small artifacts, start both services on loopback, run the scenarios")
    _add_scenario_flags(local)
    local.add_argument("--workdir", type=Path, default=None, help="data, artifacts and logs (default var/loadtest)")
    local.add_argument("--rebuild", action="store_true", help="regenerate the data and rebuild the artifacts")
    local.add_argument("--no-docs", action="store_true", help="do not rewrite the docs/benchmarks.md section")

    run = sub.add_parser("run", help="run the scenarios against running services (e.g. a cluster)")
    _add_scenario_flags(run)
    run.add_argument("--target", default=None, help="ranking service host:port")
    run.add_argument("--retrieval", default=None, help="retrieval service host:port (for SimilarItems)")
    run.add_argument("--ids", type=Path, default=None, help="ids file written by `ids`")
    run.add_argument("--artifacts", type=Path, default=None, help="artifact root the services serve (ids from it)")
    run.add_argument("--ca", type=Path, default=None, help="CA of the server certificates: TLS")
    run.add_argument("--cert", type=Path, default=None, help="client certificate (mutual TLS)")
    run.add_argument("--key", type=Path, default=None, help="client key (mutual TLS)")
    run.add_argument("--server-name", default=None, help="name the server certificate must carry")
    run.add_argument("--system-roots", action="store_true", help="TLS trusting the system CAs (public certificate)")
    run.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token")
    run.add_argument("--docs", type=Path, default=None, help="also rewrite the loadtest section of this markdown file")

    ids = sub.add_parser("ids", help="write the users and items of a served artifact directory to a JSON file")
    ids.add_argument("--artifacts", type=Path, required=True, help="artifact root (index or index shards)")
    ids.add_argument("--data", type=Path, default=None, help="the dataset it was built from (session context)")
    ids.add_argument("--out", type=Path, required=True)
    return parser


def _scenario_overrides(args: argparse.Namespace, base: LoadTestSettings) -> list[dict[str, Any]] | None:
    steady = {"users": args.users, "rate": args.rate, "duration_s": args.duration}
    ramp: dict[str, Any] = {"stage_s": args.stage_seconds}
    if args.stages is not None:
        ramp["stages"] = [int(part) for part in args.stages.split(",") if part.strip()]
    if all(value is None for value in (*steady.values(), *ramp.values())):
        return None
    scenarios = []
    for scenario in base.scenarios:
        dumped = scenario.model_dump()
        chosen = steady if scenario.kind == "steady" else ramp
        dumped.update({key: value for key, value in chosen.items() if value is not None})
        scenarios.append(dumped)
    return scenarios


def _settings(args: argparse.Namespace) -> LoadTestSettings:
    overrides: dict[str, Any] = {"timeout_s": args.timeout, "out": args.out}
    if args.scenario:
        overrides["only"] = args.scenario
    if args.command == "local":
        overrides["local"] = {"workdir": args.workdir}
        if args.workdir is not None:
            overrides["run_dir"] = args.workdir / "run"
    else:
        tls = {
            "ca_file": args.ca,
            "cert_file": args.cert,
            "key_file": args.key,
            "server_name_override": args.server_name,
        }
        overrides.update(
            target=args.target,
            retrieval_target=args.retrieval,
            ids_file=args.ids,
            artifacts=args.artifacts,
            tls=tls,
            system_roots=args.system_roots or None,
        )
        if args.token_file is not None:
            overrides["token"] = args.token_file.read_text().strip()
    settings = load_loadtest_settings(**overrides)
    scenarios = _scenario_overrides(args, settings)
    if scenarios is not None:
        settings = load_loadtest_settings(**overrides, scenarios=scenarios)
    if args.command == "run":
        # A cluster run leaves the repository's docs alone unless asked.
        settings = settings.model_copy(update={"docs": args.docs})
    elif args.no_docs:
        settings = settings.model_copy(update={"docs": None})
    return settings


def _report(settings: LoadTestSettings, report: Any) -> None:
    from deploy.loadtest.results import console_table, markdown_section, update_docs, write_report

    print()
    print(console_table(report))
    write_report(report, settings.out)
    print(f"\nresults in {settings.out}")
    if settings.docs is not None:
        update_docs(settings.docs, markdown_section(report), report.machine)
        print(f"section <!-- loadtest --> of {settings.docs} updated")


def main(argv: Sequence[str] | None = None) -> int:
    args = _configure_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "ids":
            from deploy.loadtest.ids import ids_from_artifacts, write_ids

            ids = ids_from_artifacts(args.artifacts, args.data)
            write_ids(ids, args.out)
            print(f"{args.out}: {len(ids.users)} users, {len(ids.items)} items")
            return 0
        settings = _settings(args)
        if args.command == "local":
            from deploy.loadtest.local import run_local

            report = run_local(settings, args.command_label or "make loadtest", rebuild=args.rebuild)
        else:
            from deploy.loadtest.runner import run_scenarios

            label = args.command_label or "python -m deploy.loadtest run " + " ".join((argv or sys.argv[1:])[1:])
            setup = f"Services at {settings.target} (ranking) and {settings.retrieval_target} (retrieval)."
            report = run_scenarios(settings, label, setup, progress=lambda line: print(f"== {line}", flush=True))
        _report(settings, report)
        return 0
    except (LoadTestError, LoadTestSettingsError, ArtifactError, SecurityConfigError, OSError, ValueError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
