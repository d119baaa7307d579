"""Experiments: stable assignment by user id, traffic shares, the variant's rules and model."""

from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from ranking_service.experiments import assign, bucket
from ranking_service.pipeline import Recommendation
from ranking_service.server import impression_record
from shared.artifacts import ArtifactError
from shared.config import ExperimentsSettings, RankingSettings
from shared.data import Dataset
from tests.conftest import BuiltArtifacts, Servers, users_by_activity
from tests.ranking_helpers import ranking_server, recommend

EXPERIMENTS = {
    "salt": "winter-test",
    "variants": [
        {"name": "one-per-brand", "share": 0.3, "rules": {"max_per_brand": 1}},
        {
            "name": "diverse",
            "share": 0.2,
            "rules": {"mmr_lambda": 0.5},
            "candidate_mix": [{"source": "content", "share": 0.7}],
        },
    ],
}


def test_shares_hold_over_10k_ids() -> None:
    settings = ExperimentsSettings.model_validate(EXPERIMENTS)
    counts = collections.Counter(
        (variant.name if variant else "") for variant in (assign(f"user-{n}", settings) for n in range(10_000))
    )
    shares = {name: count / 10_000 for name, count in counts.items()}
    print(f"\nassignment over 10k ids: {shares}")
    assert shares["one-per-brand"] == pytest.approx(0.3, abs=0.02)
    assert shares["diverse"] == pytest.approx(0.2, abs=0.02)
    assert shares[""] == pytest.approx(0.5, abs=0.02)


def test_assignment_is_stable_across_calls_and_processes() -> None:
    settings = ExperimentsSettings.model_validate(EXPERIMENTS)
    ids = [f"user-{n}" for n in range(200)]
    here = [(variant.name if variant else "") for variant in (assign(i, settings) for i in ids)]
    assert here == [(variant.name if variant else "") for variant in (assign(i, settings) for i in ids)]
    script = (
        "import json, sys\n"
        "from ranking_service.experiments import assign\n"
        "from shared.config import ExperimentsSettings\n"
        "settings = ExperimentsSettings.model_validate(json.loads(sys.argv[1]))\n"
        "ids = json.loads(sys.argv[2])\n"
        "print(json.dumps([(v.name if v else '') for v in (assign(i, settings) for i in ids)]))\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, json.dumps(EXPERIMENTS), json.dumps(ids)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(other.stdout) == here
    # Another salt re-shuffles users.
    assert bucket("user-1", "a") != bucket("user-1", "b")


@pytest.mark.parametrize(
    ("experiments", "fragment"),
    [
        ({"variants": [{"name": "a", "share": 0.7}, {"name": "b", "share": 0.4}]}, "sum to 1.1"),
        ({"variants": [{"name": "a", "share": 0.1}, {"name": "a", "share": 0.1}]}, "unique"),
        ({"variants": [{"name": "a", "share": 0}]}, "greater than 0"),
        ({"variants": [{"name": "a", "share": 0.1, "rules": {"mmr_lambda": 2}}]}, "mmr_lambda"),
        ({"variants": [{"name": "a", "share": 0.1, "rules": {"never_together": [["x", "y"]]}}]}, "variants.a.rules"),
    ],
)
def test_bad_experiment_config_fails_at_start(experiments: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        RankingSettings.model_validate({"experiments": experiments})


def test_variant_in_response_and_log_and_its_rules_apply(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    experiments = {
        **EXPERIMENTS,
        "variants": [
            {**EXPERIMENTS["variants"][0], "model_version": artifacts.ranker.version},  # type: ignore[dict-item]
            EXPERIMENTS["variants"][1],
        ],
    }
    settings = ExperimentsSettings.model_validate(experiments)
    users = users_by_activity(dataset)[:60]
    seen: collections.Counter[str] = collections.Counter()
    with (
        caplog.at_level(logging.INFO, logger="ranking_service.server"),
        ranking_server(artifacts, servers, experiments=experiments) as stub,
    ):
        for user in users:
            response = recommend(stub, dataset, user, 10)
            expected = assign(user, settings)
            assert response.variant == (expected.name if expected else "")
            assert recommend(stub, dataset, user, 10).variant == response.variant
            seen[response.variant] += 1
            rules = [e.rule for e in response.rule_effects]
            if response.variant == "one-per-brand":
                assert max(collections.Counter(item.brand for item in response.items).values()) == 1
                assert "max_per_brand" in rules
                assert response.model_version == artifacts.ranker.version
            elif response.variant == "diverse":
                assert rules[-1] == "mmr"
            else:
                assert rules == ["exclude_seen", "exclude_ids", "not_launched", "out_of_stock"]
    assert all(seen[name] > 0 for name in ("one-per-brand", "diverse", "")), seen
    logged = [r for r in caplog.records if r.getMessage() == "recommend"]
    variants = [getattr(r, "fields", {}).get("variant") for r in logged]
    assert collections.Counter(variants) == collections.Counter({k: 2 * v for k, v in seen.items()})
    mixes = [
        getattr(r, "fields", {}).get("candidate_mix")
        for r in logged
        if getattr(r, "fields", {})["variant"] == "diverse"
    ]
    assert all(mix == {"content": 0.7} for mix in mixes)


def test_bucket_is_uniform_enough() -> None:
    values = np.asarray([bucket(f"id-{n}", "s") for n in range(10_000)])
    assert values.min() >= 0
    assert values.max() < 1
    assert np.histogram(values, bins=10, range=(0, 1))[0].min() > 900


def test_a_pinned_model_version_that_does_not_exist_stops_the_start(
    artifacts: BuiltArtifacts, servers: Servers
) -> None:
    experiments = {"variants": [{"name": "old", "share": 0.1, "model_version": "20000101T000000-000000"}]}
    with (
        pytest.raises(ArtifactError, match="20000101T000000-000000"),
        ranking_server(artifacts, servers, experiments=experiments),
    ):
        pass


def test_impression_log_records_the_variant() -> None:
    result = Recommendation(
        items=[],
        model_version="m1",
        index_version="i1",
        cold_start=False,
        degraded_reason="",
        partial_reason="",
        stage_ms={},
        variant="diverse",
    )
    record = impression_record("request-1", "user-1", "home", result)
    assert (record["variant"], record["surface"], record["model_version"]) == ("diverse", "home", "m1")
