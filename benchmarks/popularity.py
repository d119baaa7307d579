"""How popularity should be counted (docs/retrieval.md, "Popularity").

Splits a dataset with an evaluation protocol and ranks every evaluated user's unseen
items by popularity alone, counted the way the retrieval build counts it
(``retrieval_service.source_tables.decayed_counts``) under several half-lives and prior
weights; prints NDCG@k on the test part, and on a validation split of train (the split a
build could tune on), with the decayed weight the recent window holds.

    python -m benchmarks.popularity --dataset movielens-100k:/work/shared/data/ml-100k --protocol temporal
"""

from __future__ import annotations

import argparse

from shared.evaluation.baselines import RecentPopular, TrainPart, top_k
from shared.evaluation.protocols import PROTOCOLS, Split, split, validation_split
from shared.interactions import recency_weights
from shared.loaders import add_dataset_arguments, load_from_arguments
from shared.metrics import top_k_metrics

HALF_LIVES_DAYS: tuple[float | None, ...] = (3.0, 14.0, 90.0, None)
PRIOR_WEIGHTS = (0.0, 100.0, 1000.0)


def popularity_ndcg(test: Split, half_life_days: float | None, prior_weight: float, k: int) -> float:
    """NDCG@k of one popularity list for every evaluated user, their train items removed."""
    matrix = test.train_matrix()
    popular = RecentPopular(half_life_days, prior_weight)
    popular.fit(TrainPart(matrix, test.train.events, test.request_time))
    users = test.evaluated_users
    lists = top_k(popular, matrix, users, k)
    return top_k_metrics(lists, [test.test_items[user] for user in users], k, matrix.shape[1])[f"ndcg@{k}"]


def recent_weight(test: Split, half_life_days: float) -> float:
    """The decayed interaction weight the train part holds at the request time."""
    events = test.train.events
    return float(recency_weights(events.event_code, events.timestamp, test.request_time, half_life_days).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataset_arguments(parser)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="temporal")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    dataset = load_from_arguments(args).dataset
    test = split(dataset, args.protocol, args.seed)
    validation = validation_split(test.train, args.protocol, args.seed)
    print(f"# {dataset.name}, protocol {args.protocol}, NDCG@{args.k} of popularity alone\n")
    print("| half-life (days) | prior weight | recent weight (test) | test | validation |")
    print("|---|---:|---:|---:|---:|")
    for half_life in HALF_LIVES_DAYS:
        weight = f"{recent_weight(test, half_life):,.0f}" if half_life is not None else ""
        for prior in PRIOR_WEIGHTS if half_life is not None else (0.0,):
            scores = [popularity_ndcg(part, half_life, prior, args.k) for part in (test, validation)]
            label = f"{half_life:g}" if half_life is not None else "all time"
            print(f"| {label} | {prior:g} | {weight} | {scores[0]:.4f} | {scores[1]:.4f} |")


if __name__ == "__main__":
    main()
