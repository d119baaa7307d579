"""What the ranker's trees add on an evaluation's test split (docs/evaluation.md).

Loads the artifacts a ``vitrine evaluate`` run built (``OUT/work/artifacts``) into one
process, as ``benchmarks.e2e.load_floor`` does, and answers every evaluated user of the
same split three ways: the served request path (``RankingPipeline.recommend``), the
ranker's prior alone (its item model score on the same candidates) and retrieval's
order. Prints NDCG@k of each. A diagnosis, never a tuning signal: it reads the test part.

    VITRINE_RETRIEVAL__NPROBE=32 VITRINE_RETRIEVAL__REFINE_FACTOR=3 python -m benchmarks.ranker_vs_prior \\
        --dataset movielens-100k:/work/shared/data/ml-100k --protocol random --artifacts var/eval/work/artifacts
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks.e2e import InProcessRetrieval
from ranking_service.artifact import load_ranker_artifact
from ranking_service.features import RequestContext
from ranking_service.pipeline import RankingPipeline, RecommendQuery
from retrieval_service.artifact import load_index_artifact
from retrieval_service.retriever import Retriever
from shared.config import load_settings
from shared.evaluation.protocols import PROTOCOLS, split
from shared.loaders import add_dataset_arguments, load_from_arguments
from shared.metrics import top_k_metrics

CALL_TIMEOUT_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataset_arguments(parser)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="random")
    parser.add_argument("--seed", type=int, default=42, help="the evaluate run's seed")
    parser.add_argument("--artifacts", type=Path, required=True, help="the evaluate run's OUT/work/artifacts")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    test = split(load_from_arguments(args).dataset, args.protocol, args.seed)
    settings = load_settings()
    served = settings.retrieval
    index = load_index_artifact(args.artifacts, nprobe=served.nprobe, refine_factor=served.refine_factor)
    retriever = Retriever(index, max_candidates=served.max_candidates, max_exclusions=served.max_exclusions)
    ranker = load_ranker_artifact(args.artifacts)
    prior = ranker.model.prior
    if prior is None:
        raise SystemExit(f"{args.artifacts}: this ranker has no prior (ranker_build.prior_feature is null)")
    pipeline = RankingPipeline(
        ranker, InProcessRetrieval(retriever), settings.ranking.model_copy(update={"compiled_trees": False})
    )
    item_ids = test.train.catalog.item_ids
    row_of = {item_id: row for row, item_id in enumerate(item_ids.tolist())}
    events = test.train.events
    lists: dict[str, list[npt.NDArray[np.int32]]] = {"served": [], "prior alone": [], "retrieval order": []}
    users = test.evaluated_users
    for user in users.tolist():
        user_id = str(test.train.users.user_ids[user])
        seen = item_ids[np.unique(events.item_index[events.user_index == user])].tolist()
        answer = pipeline.recommend(RecommendQuery(user_id, args.k, test.request_time, "", (), seen), CALL_TIMEOUT_S)
        lists["served"].append(np.asarray([row_of[item.item_id] for item in answer.items], dtype=np.int32))
        # The same stages by hand, to order the same candidates by the prior or by retrieval.
        context = RequestContext(timestamp=test.request_time, device="", session_rows=np.zeros(0, np.int32))
        history = ranker.histories.history(user_id, before=test.request_time + 1, limit=None)
        excluded = np.asarray([ranker.item_row[item] for item in seen if item in ranker.item_row], dtype=np.int32)
        candidates = pipeline.retrieve(user_id, history, context, excluded, CALL_TIMEOUT_S).candidates
        features = pipeline.features(history, context, candidates)
        for name, order in (
            ("prior alone", np.argsort(-prior.of(features.values), kind="stable")),
            ("retrieval order", np.arange(len(candidates.rows))),
        ):
            top = ranker.items.item_ids[candidates.rows[order[: args.k]]].tolist()
            lists[name].append(np.asarray([row_of[item] for item in top], dtype=np.int32))
    held_out = [test.test_items[user] for user in users]
    for name, top_lists in lists.items():
        metrics = top_k_metrics(top_lists, held_out, args.k, len(item_ids))
        ndcg, hit_rate = metrics[f"ndcg@{args.k}"], metrics[f"hit_rate@{args.k}"]
        print(f"{name:>16}  ndcg@{args.k} {ndcg:.4f}  hit_rate@{args.k} {hit_rate:.4f}")


if __name__ == "__main__":
    main()
