"""Sessions in the item model, offline (docs/evaluation.md, "What moved it: sessions").

Splits a dataset with an evaluation protocol and fits the item model's closed form (EASE
on user rows plus session rows, ``shared.item_model.session_rows``) under several session
gaps and weights, each at the L2 of ``EASE_L2_GRID`` its validation splits prefer; prints
NDCG@k against the users-only fit (weight 0) on the mean of validation splits of train
(what a build can tune on) and on the test part.

    python -m benchmarks.item_model_sessions --dataset movielens-100k:/work/shared/data/ml-100k
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import replace

import numpy as np

from shared.config import EASE_L2_GRID, ItemModelSettings
from shared.evaluation.baselines import EASE, EASE_BASELINE, TrainPart, tune
from shared.evaluation.protocols import PROTOCOLS, Split, split
from shared.item_model import session_rows
from shared.loaders import add_dataset_arguments, load_from_arguments

GAPS_S = (60, 300, 1800, 86_400)
WEIGHTS = (2.0, 4.0, 8.0)


def session_ease_ndcgs(part: Split, settings: ItemModelSettings, l2_grid: list[float], k: int) -> dict[float, float]:
    """NDCG@k on ``part``'s test items, per L2 of ``l2_grid``, of EASE fitted on its train
    rows and, as ``settings`` says, session rows."""
    matrix = part.train_matrix()
    events = part.train.events
    sessions = session_rows(events, events.item_index, matrix.shape[1], matrix.nnz, settings)
    baseline = replace(EASE_BASELINE, build=functools.partial(EASE, extra_rows=sessions), grid={"l2": l2_grid})
    tuned = tune(baseline, TrainPart(matrix), part.test_items, part.evaluated_users, k)
    return {float(params["l2"]): ndcg for params, ndcg in tuned.trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataset_arguments(parser)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="random")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--validation-splits", type=int, default=3)
    args = parser.parse_args()
    dataset = load_from_arguments(args).dataset
    test = split(dataset, args.protocol, args.seed)
    validations = [split(test.train, args.protocol, args.seed + offset) for offset in range(args.validation_splits)]
    configurations = [(0, 0.0)] + [(gap, 4.0) for gap in GAPS_S] + [(GAPS_S[0], w) for w in WEIGHTS if w != 4.0]
    reference: tuple[float, float] | None = None
    print(f"{'gap s':>7} {'weight':>6} {'L2':>6} {'validation':>10} {'vs users':>8} {'test':>7} {'vs users':>8}")
    for gap_s, weight in configurations:
        settings = ItemModelSettings(session_gap_s=gap_s, session_weight=weight)
        per_split = [session_ease_ndcgs(part, settings, list(EASE_L2_GRID), args.k) for part in validations]
        on_validation = {l2: float(np.mean([ndcgs[l2] for ndcgs in per_split])) for l2 in EASE_L2_GRID}
        l2 = max(on_validation, key=lambda value: on_validation[value])
        on_test = session_ease_ndcgs(test, settings, [l2], args.k)[l2]
        reference = reference or (on_validation[l2], on_test)
        print(
            f"{gap_s if weight else '-':>7} {weight:>6.0f} {l2:>6.0f} {on_validation[l2]:>10.4f} "
            f"{on_validation[l2] / reference[0] - 1:>+8.1%} {on_test:>7.4f} {on_test / reference[1] - 1:>+8.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
