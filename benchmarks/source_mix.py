"""Choose the default candidate mix by measurement (docs/retrieval.md, "Choosing the mix").

Splits a dataset with an evaluation protocol, builds the index on the train part (real
text model), and for every evaluated user asks the in-process retriever for ``n``
candidates under each mix; prints candidate recall@n (the share of test items among the
candidates: what the ranker can at best find) and NDCG@k of the retrieval order.

    python -m benchmarks.source_mix --data /work/shared/data/ml-100k --protocol random
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from retrieval_service.artifact import build_index_artifact, load_index_artifact
from retrieval_service.retriever import QueryOptions, Retriever
from shared.config import load_settings
from shared.embeddings import SentenceTransformerEmbedder
from shared.evaluation.protocols import split
from shared.loaders import load_movielens_100k
from shared.metrics import candidate_recall, top_k_metrics

MIXES: dict[str, list[tuple[str, float]]] = {
    "fused": [("fused", 1.0)],
    "fused+covis": [("fused", 0.8), ("covisitation", 0.2)],
    "fused+covis+trend": [("fused", 0.7), ("covisitation", 0.15), ("trending", 0.05), ("trending_category", 0.1)],
    "default": [],
    "halves": [("fused", 0.6), ("content", 0.2), ("collaborative", 0.2)],
    "covis-heavy": [("fused", 0.5), ("covisitation", 0.4), ("trending_category", 0.1)],
    "collab-heavy": [("fused", 0.5), ("collaborative", 0.3), ("covisitation", 0.2)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the MovieLens 100K folder")
    parser.add_argument("--protocol", choices=("random", "temporal"), default="random")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    settings = load_settings()
    dataset = load_movielens_100k(args.data).dataset
    test = split(dataset, args.protocol, args.seed)
    train = test.train
    users = test.evaluated_users.tolist()
    relevant = [test.test_items[user] for user in users]
    user_ids = train.users.user_ids.tolist()
    row_of = train.catalog.index_of()
    order = np.argsort(train.events.user_index, kind="stable")
    bounds = np.searchsorted(train.events.user_index[order], np.arange(len(user_ids) + 1))
    seen = [
        train.catalog.item_ids[np.unique(train.events.item_index[order[bounds[u] : bounds[u + 1]]])].tolist()
        for u in range(len(user_ids))
    ]
    with tempfile.TemporaryDirectory() as root:
        build_index_artifact(train, SentenceTransformerEmbedder(settings.embedding), Path(root), settings.index_build)
        loaded = load_index_artifact(Path(root))
    retriever = Retriever(loaded, 1000, 100_000, mix=settings.retrieval.sources)
    results = {}
    for name, mix in MIXES.items():
        lists = []
        for user in users:
            found = retriever.by_user(user_ids[user], args.n, seen[user], QueryOptions(mix=mix))
            lists.append(np.asarray([row_of[item] for item in found.item_ids], dtype=np.int32))
        metrics = top_k_metrics([rows[: args.k] for rows in lists], relevant, args.k, len(train.catalog))
        results[name] = {
            f"recall@{args.n}": round(candidate_recall(lists, relevant), 4),
            f"ndcg@{args.k}": round(metrics[f"ndcg@{args.k}"], 4),
        }
        print(name, json.dumps(results[name]), flush=True)


if __name__ == "__main__":
    main()
