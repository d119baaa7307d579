"""``vitrine evaluate``: the whole pipeline and tuned baselines on one split of real data."""
