"""One evaluation run: split, tuned baselines, Vitrine's variants, metrics, report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from shared.data import Dataset
from shared.evaluation.baselines import BASELINES, Baseline, TrainPart, top_k, tune
from shared.evaluation.pipeline import FUSED, SOURCE_CANDIDATES, run_vitrine
from shared.evaluation.protocols import Protocol, Split, split, validation_split
from shared.evaluation.report import write_report
from shared.logs import event
from shared.metrics import candidate_recall, top_k_metrics

log = logging.getLogger(__name__)

CANDIDATE_SIZES = (100, 200, 300, 500, 1000)


@dataclass(frozen=True)
class MethodResult:
    name: str
    kind: Literal["baseline", "vitrine"]
    metrics: dict[str, float]
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    # The same metrics per user group (user_groups), when the split has more than one.
    by_group: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Results:
    dataset: str
    protocol: Protocol
    k: int
    seed: int
    methods: list[MethodResult]
    candidate_recall: dict[int, float]
    feature_importance: dict[str, float]
    split: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "candidate_recall": {str(n): recall for n, recall in self.candidate_recall.items()},
        }

    def method(self, name: str) -> MethodResult:
        return next(method for method in self.methods if method.name == name)


def evaluate(
    dataset: Dataset, protocol: Protocol, k: int, seed: int, out: Path, baselines: Sequence[Baseline] = BASELINES
) -> Results:
    out.mkdir(parents=True, exist_ok=True)
    test = split(dataset, protocol, seed)
    users = test.evaluated_users
    relevant = [test.test_items[user] for user in users]
    summary = _split_summary(test)
    groups = user_groups(test)
    event(log, "split", protocol=protocol, **summary, groups={name: len(members) for name, members in groups.items()})

    def scored(
        name: str,
        kind: Literal["baseline", "vitrine"],
        lists: list[npt.NDArray[np.int32]],
        seconds: float,
        params: dict[str, Any] | None = None,
    ) -> MethodResult:
        metrics, by_group = list_metrics(test, groups, lists, k)
        return MethodResult(name, kind, metrics, round(seconds, 2), params or {}, by_group)

    methods = _baselines(test, validation_split(test.train, protocol, seed), k, scored, baselines)
    vitrine = run_vitrine(test, out / "work", k, max(CANDIDATE_SIZES))
    for name, lists in vitrine.top_k.items():
        methods.append(scored(name, "vitrine", lists, vitrine.seconds[name]))
    recall_curve = {
        n: candidate_recall([vitrine.candidates[user][:n] for user in users], relevant) for n in CANDIDATE_SIZES
    }
    if vitrine.degraded:
        event(log, "degraded answers during evaluation", count=vitrine.degraded, level=logging.WARNING)
    results = Results(
        dataset=dataset.name,
        protocol=protocol,
        k=k,
        seed=seed,
        methods=methods,
        candidate_recall=recall_curve,
        feature_importance=vitrine.feature_importance,
        split={
            **summary,
            "vitrine_build_seconds": round(vitrine.build_seconds, 1),
            "degraded": vitrine.degraded,
            "candidates_from": FUSED,
            f"candidate_recall@{SOURCE_CANDIDATES}_configured_mix": round(
                candidate_recall([vitrine.source_candidates[user] for user in users], relevant), 4
            )
            if vitrine.source_candidates
            else None,
        },
    )
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    write_report(results, out)
    return results


def _baselines(
    test: Split, validation: Split, k: int, scored: Any, baselines: Sequence[Baseline]
) -> list[MethodResult]:
    train = _train_part(test)
    validation_train = _train_part(validation)
    results = []
    for baseline in tqdm(baselines, desc="baselines", unit="method"):
        n_items = train.matrix.shape[1]
        if baseline.max_items is not None and n_items > baseline.max_items:
            event(log, "baseline skipped", method=baseline.name, items=n_items, limit=baseline.max_items)
            continue
        tuned = tune(baseline, validation_train, validation.test_items, validation.evaluated_users, k)
        started = time.perf_counter()
        recommender = baseline.build(**tuned.params)
        recommender.fit(train)
        lists: list[npt.NDArray[np.int32]] = [np.zeros(0, dtype=np.int32)] * train.matrix.shape[0]
        ranked_lists = top_k(recommender, train.matrix, test.evaluated_users, k)
        for user, ranked in zip(test.evaluated_users, ranked_lists, strict=True):
            lists[user] = ranked
        seconds = time.perf_counter() - started + tuned.seconds
        event(log, "baseline tuned", method=baseline.name, params=tuned.params, validation_ndcg=tuned.validation_ndcg)
        results.append(
            scored(
                baseline.name, "baseline", lists, seconds, {**tuned.params, "validation_ndcg": tuned.validation_ndcg}
            )
        )
    return results


def _train_part(part: Split) -> TrainPart:
    return TrainPart(part.train_matrix(), part.train.events, part.request_time)


def list_metrics(
    test: Split, groups: dict[str, npt.NDArray[np.int64]], lists: list[npt.NDArray[np.int32]], k: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Top-k metrics of one method's lists (one per user row) over the evaluated users,
    and per group (with its user count) when there is more than one group."""
    n_items = len(test.train.catalog)

    def over(members: npt.NDArray[np.int64]) -> dict[str, float]:
        return top_k_metrics([lists[user] for user in members], [test.test_items[user] for user in members], k, n_items)

    metrics = over(test.evaluated_users)
    metrics.pop("users")
    return metrics, ({group: over(members) for group, members in groups.items()} if len(groups) > 1 else {})


def user_groups(test: Split) -> dict[str, npt.NDArray[np.int64]]:
    """The evaluated users with no train event (a time split's newcomers, who get a
    cold-start answer) and those with some; empty groups left out."""
    users = test.evaluated_users
    history_sizes = np.diff(test.train_matrix().indptr)[users]
    groups = {"without_history": users[history_sizes == 0], "with_history": users[history_sizes > 0]}
    return {name: members for name, members in groups.items() if len(members)}


def _split_summary(test: Split) -> dict[str, Any]:
    return {
        "users": len(test.train.users),
        "items": len(test.train.catalog),
        "train_events": len(test.train.events),
        "evaluated_users": len(test.evaluated_users),
        "test_items": int(sum(len(items) for items in test.test_items)),
        "request_time": test.request_time,
    }
