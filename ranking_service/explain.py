"""Human-readable reasons, from the features that made an item rank."""

from __future__ import annotations

import numpy as np

from ranking_service.features import FEATURE_INDEX, FeatureMatrix, intent_verb
from ranking_service.store import ItemTable

# Cosine between MiniLM texts above which two products read as "similar".
SIMILAR_CONTENT = 0.6
STRONG_BRAND_AFFINITY = 0.2
STRONG_CATEGORY_AFFINITY = 0.25


def reasons(features: FeatureMatrix, positions: np.ndarray, candidate_rows: np.ndarray, items: ItemTable) -> list[str]:
    """One reason per selected position, most specific evidence first."""
    values = features.values
    explained: list[str] = []
    for position in positions.tolist():
        row = int(candidate_rows[position])
        closest = int(features.closest_history_row[position])
        similarity = values[position, FEATURE_INDEX["content_sim_recent_max"]]
        if closest >= 0 and closest != row and similarity >= SIMILAR_CONTENT:
            verb = intent_verb(int(features.closest_history_code[position]))
            explained.append(f"similar to {items.titles[closest]} you {verb}")
        elif values[position, FEATURE_INDEX["user_item_interactions"]] > 0:
            explained.append("you looked at this recently")
        elif values[position, FEATURE_INDEX["user_brand_affinity"]] >= STRONG_BRAND_AFFINITY:
            explained.append(f"from {items.brands[row]}, a brand you like")
        elif values[position, FEATURE_INDEX["user_category_affinity"]] >= STRONG_CATEGORY_AFFINITY:
            explained.append(f"popular in {items.categories[row]}, which you browse")
        else:
            explained.append(f"popular in {items.categories[row]}")
    return explained
