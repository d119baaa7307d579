"""Business rules applied after the model: a chain of small rule components.

Each rule takes its settings, the candidates and the current ranked list (positions into
the candidate arrays, best first) and returns a new list plus an effect record. The
chain runs in a fixed order (docs/rules.md):

1. ``exclude_seen``      drop items the user had the configured events on, within the window
2. ``exclude_ids``       drop the request's explicit ``exclude_item_ids``
3. ``not_launched``      drop items created after the request's moment (a launch date ahead)
4. ``out_of_stock``      drop items without stock (retrieval's live stock, else the snapshot's)
5. ``allowed_brands``    keep only the allowed brands (house brands for a surface)
6. ``boosts``            multiply scores (+ ln m on the ranker score) and re-sort
7. ``brand_boundary``    never two groups of a ``never_together`` pair in one list: walking
                         the list by (boosted) score, the first group seen wins
8. ``max_per_brand`` / ``max_per_category``   keep the best n per brand / category
9. ``mmr``               maximal marginal relevance over the best ``mmr_pool_factor`` x k
10. ``pins``             curated items to their positions (if they survived 1-7)

Filters (1-5, 7, 8) report ``removed``: candidates they dropped. Re-orderings (6, 9, 10)
report ``moved``: positions among the first k whose item changed. Only rules that are
configured run (and are reported). Pinned items are exempt from caps and MMR.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from ranking_service.store import ItemTable, UserHistory
from shared.config import RulesOverrides, RulesSettings
from shared.data import EVENT_CODE
from shared.errors import InvalidArgument
from shared.interactions import SECONDS_PER_DAY

Positions = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RuleEffect:
    rule: str
    removed: int = 0
    moved: int = 0


@dataclass(frozen=True)
class RuleContext:
    """What the rules know about one request besides its candidates."""

    items: ItemTable
    history: UserHistory
    session_rows: npt.NDArray[np.int32]
    excluded_rows: npt.NDArray[np.int32]
    now: int
    k: int


@dataclass(frozen=True)
class Candidates:
    rows: npt.NDArray[np.int32]
    scores: npt.NDArray[np.float32]
    # Per candidate, its stock now.
    stock: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Ranked:
    """The working list: positions into the candidate arrays, best first, and the scores
    (per candidate position) the rules have adjusted so far."""

    order: Positions
    scores: npt.NDArray[np.float32]


class Rule(Protocol):
    name: ClassVar[str]

    def apply(self, ranked: Ranked, candidates: Candidates, context: RuleContext) -> Ranked: ...


def _moved(before: Positions, after: Positions, k: int) -> int:
    shown = min(k, len(after))
    if not shown:
        return 0
    head = np.full(shown, -1, dtype=np.int64)
    head[: min(shown, len(before))] = before[:shown]
    return int((head != after[:shown]).sum())


class FilterRule(ABC):
    """A rule that drops candidates: subclasses say which positions to keep."""

    name: ClassVar[str] = "filter"

    @abstractmethod
    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]: ...

    def apply(self, ranked: Ranked, candidates: Candidates, context: RuleContext) -> Ranked:
        return Ranked(ranked.order[self.keep(ranked.order, candidates, context)], ranked.scores)


@dataclass(frozen=True)
class ExcludeSeen(FilterRule):
    name: ClassVar[str] = "exclude_seen"
    event_types: tuple[str, ...]
    window_days: int  # 0: forever

    def seen_rows(self, context: RuleContext) -> npt.NDArray[np.int32]:
        history = context.history
        codes = [EVENT_CODE[t] for t in self.event_types if t in EVENT_CODE]
        hit = np.isin(history.event_codes, codes)
        if self.window_days:
            hit &= history.timestamps >= context.now - self.window_days * SECONDS_PER_DAY
        seen = history.item_rows[hit]
        if "view" in self.event_types:  # session items are views happening now
            seen = np.concatenate([seen, context.session_rows])
        return np.unique(seen).astype(np.int32)

    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]:
        return ~np.isin(candidates.rows[order], self.seen_rows(context))


class ExcludeIds(FilterRule):
    name: ClassVar[str] = "exclude_ids"

    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]:
        return ~np.isin(candidates.rows[order], context.excluded_rows)


class NotLaunched(FilterRule):
    """Items whose ``created_at`` is after the request's moment: a catalogue loaded ahead of a
    launch date, or a request replayed from before the item existed. Training never shows
    the ranker such items (ranking_service/training.py), so serving does not either."""

    name: ClassVar[str] = "not_launched"

    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]:
        return np.asarray(context.items.created_at[candidates.rows[order]] <= context.now, dtype=bool)


class OutOfStock(FilterRule):
    name: ClassVar[str] = "out_of_stock"

    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]:
        return np.asarray(candidates.stock[order] > 0, dtype=bool)


@dataclass(frozen=True)
class AllowedBrands(FilterRule):
    name: ClassVar[str] = "allowed_brands"
    brands: frozenset[str]

    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]:
        return np.isin(context.items.brands[candidates.rows[order]], list(self.brands))


@dataclass(frozen=True)
class Boosts:
    """Score x multiplier, as + ln(multiplier) on the ranker's (log-scale, possibly negative)
    score; several matching boosts multiply. Re-sorts the list by the boosted score."""

    name: ClassVar[str] = "boosts"
    by_item: dict[str, float]
    by_brand: dict[str, float]
    by_category: dict[str, float]

    def apply(self, ranked: Ranked, candidates: Candidates, context: RuleContext) -> Ranked:
        items, rows = context.items, candidates.rows
        log_boost = np.zeros(len(rows), dtype=np.float64)
        for table, values in (
            (self.by_item, items.item_ids[rows]),
            (self.by_brand, items.brands[rows]),
            (self.by_category, items.categories[rows]),
        ):
            for key, multiplier in table.items():
                log_boost[values == key] += math.log(multiplier)
        scores = (ranked.scores + log_boost).astype(np.float32)
        order = ranked.order[np.argsort(-scores[ranked.order], kind="stable")]
        return Ranked(order, scores)


@dataclass(frozen=True)
class BrandBoundary(FilterRule):
    """``never_together`` pairs of brand groups: walking the list best first, an item is kept
    unless one of its groups is paired with a group already in the list; the group of the
    higher-scored item therefore wins the whole list."""

    name: ClassVar[str] = "brand_boundary"
    groups: dict[str, frozenset[str]]
    never_together: tuple[tuple[str, str], ...]

    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]:
        names = sorted(self.groups)
        index = {name: i for i, name in enumerate(names)}
        conflicts = np.zeros((len(names), len(names)), dtype=bool)
        for a, b in self.never_together:
            conflicts[index[a], index[b]] = conflicts[index[b], index[a]] = True
        brands = context.items.brands[candidates.rows[order]]
        member = np.stack([np.isin(brands, list(self.groups[name])) for name in names], axis=1)
        keep = np.ones(len(order), dtype=bool)
        present = np.zeros(len(names), dtype=bool)
        for i in np.flatnonzero(member.any(axis=1)).tolist():
            mine = member[i]
            if (conflicts[mine] & present).any():
                keep[i] = False
            else:
                present |= mine
        return keep


@dataclass(frozen=True)
class MaxPer(FilterRule):
    """Keep the best ``limit`` items of each brand (or category); pinned items neither count
    nor are dropped."""

    attribute: ClassVar[str] = "brand_codes"
    limit: int
    pinned_rows: frozenset[int] = frozenset()

    def keep(self, order: Positions, candidates: Candidates, context: RuleContext) -> npt.NDArray[np.bool_]:
        rows = candidates.rows[order]
        pinned = np.isin(rows, list(self.pinned_rows))
        codes = np.asarray(getattr(context.items, self.attribute))[rows].astype(np.int64)
        codes[pinned] = -1
        # The rank of each item within its code, in list order.
        by_code = np.lexsort((np.arange(len(codes)), codes))
        sorted_codes = codes[by_code]
        rank = np.empty(len(codes), dtype=np.int64)
        rank[by_code] = np.arange(len(codes)) - np.searchsorted(sorted_codes, sorted_codes)
        return pinned | (rank < self.limit)


@dataclass(frozen=True)
class MaxPerBrand(MaxPer):
    name: ClassVar[str] = "max_per_brand"
    attribute: ClassVar[str] = "brand_codes"


@dataclass(frozen=True)
class MaxPerCategory(MaxPer):
    name: ClassVar[str] = "max_per_category"
    attribute: ClassVar[str] = "category_codes"


@dataclass(frozen=True)
class Mmr:
    """Maximal marginal relevance (Carbonell & Goldstein): pick, one at a time, the item
    maximising ``lambda * relevance - (1 - lambda) * max cosine to the items picked``, with
    relevance the min-max scaled score and cosine from the items' content vectors. Only the
    best ``pool_factor`` x k unpinned items are re-ordered; the rest keep their order."""

    name: ClassVar[str] = "mmr"
    lam: float
    pool_factor: int
    pinned_rows: frozenset[int] = frozenset()

    def apply(self, ranked: Ranked, candidates: Candidates, context: RuleContext) -> Ranked:
        order = ranked.order
        pinned = np.isin(candidates.rows[order], list(self.pinned_rows))
        free, held = order[~pinned], order[pinned]
        size = min(len(free), self.pool_factor * context.k)
        if size < 2:
            return ranked
        pool = free[:size]
        vectors = context.items.content_vectors[candidates.rows[pool]].astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, 1e-12)
        similarity = vectors @ vectors.T
        scores = ranked.scores[pool].astype(np.float64)
        spread = float(scores.max() - scores.min())
        relevance = (scores - scores.min()) / spread if spread > 0 else np.ones(size)
        picks = min(size, context.k)
        chosen: list[int] = []
        max_similarity = np.full(size, -np.inf)
        available = np.ones(size, dtype=bool)
        for _ in range(picks):
            penalty = np.where(np.isfinite(max_similarity), max_similarity, 0.0)
            value = self.lam * relevance - (1.0 - self.lam) * penalty
            value[~available] = -np.inf
            best = int(np.argmax(value))
            chosen.append(best)
            available[best] = False
            max_similarity = np.maximum(max_similarity, similarity[best])
        rest = np.flatnonzero(available)
        new_pool = pool[np.concatenate([np.asarray(chosen, dtype=np.int64), rest])]
        return Ranked(np.concatenate([new_pool, free[size:], held]), ranked.scores)


@dataclass(frozen=True)
class Pins:
    """Pinned items (that survived the filters) to their 0-based positions, in ascending
    position order; a position past the end of the list puts the item last."""

    name: ClassVar[str] = "pins"
    positions: dict[int, int]  # catalogue row -> position

    def apply(self, ranked: Ranked, candidates: Candidates, context: RuleContext) -> Ranked:
        rows = candidates.rows[ranked.order]
        pinned = np.isin(rows, list(self.positions))
        placed = sorted((self.positions[int(candidates.rows[p])], int(p)) for p in ranked.order[pinned])
        order = ranked.order[~pinned].tolist()
        for position, candidate in placed:
            order.insert(min(position, len(order)), candidate)
        return Ranked(np.asarray(order, dtype=np.int64), ranked.scores)


def build_chain(settings: RulesSettings, item_row: dict[str, int]) -> list[Rule]:
    """The rules ``settings`` switch on, in the documented order. Pins and item boosts on
    ids the snapshot does not know are skipped (validate them before, if that is an error)."""
    pin_rows = {item_row[pin.item_id]: pin.position for pin in settings.pins if pin.item_id in item_row}
    pinned = frozenset(pin_rows)
    chain: list[Rule] = []
    if settings.exclude_seen_types:
        chain.append(ExcludeSeen(tuple(settings.exclude_seen_types), settings.exclude_seen_window_days))
    chain.append(ExcludeIds())
    if settings.exclude_not_launched:
        chain.append(NotLaunched())
    if settings.exclude_out_of_stock:
        chain.append(OutOfStock())
    if settings.allowed_brands:
        chain.append(AllowedBrands(frozenset(settings.allowed_brands)))
    if settings.boosts:
        by: dict[str, dict[str, float]] = {"item_id": {}, "brand": {}, "category": {}}
        for boost in settings.boosts:
            for target in by:
                key = getattr(boost, target)
                if key:
                    by[target][key] = by[target].get(key, 1.0) * boost.multiplier
        chain.append(Boosts(by["item_id"], by["brand"], by["category"]))
    if settings.never_together:
        chain.append(
            BrandBoundary(
                {name: frozenset(brands) for name, brands in settings.brand_groups.items()},
                tuple((a, b) for a, b in settings.never_together),
            )
        )
    if settings.max_per_brand:
        chain.append(MaxPerBrand(settings.max_per_brand, pinned))
    if settings.max_per_category:
        chain.append(MaxPerCategory(settings.max_per_category, pinned))
    if settings.mmr_lambda < 1.0:
        chain.append(Mmr(settings.mmr_lambda, settings.mmr_pool_factor, pinned))
    if pin_rows:
        chain.append(Pins(pin_rows))
    return chain


@dataclass(frozen=True)
class RuleOutcome:
    # Positions into the candidate arrays, best first, at most k.
    selected: Positions
    # Per candidate position: the score after boosts.
    scores: npt.NDArray[np.float32]
    effects: list[RuleEffect] = field(default_factory=list)

    @property
    def removed(self) -> dict[str, int]:
        return {effect.rule: effect.removed for effect in self.effects}


def apply_chain(chain: Sequence[Rule], candidates: Candidates, context: RuleContext) -> RuleOutcome:
    """Run ``chain`` over the candidates sorted by score; keep the first k."""
    scores = candidates.scores.astype(np.float32)
    ranked = Ranked(np.argsort(-scores, kind="stable").astype(np.int64), scores)
    effects: list[RuleEffect] = []
    for rule in chain:
        after = rule.apply(ranked, candidates, context)
        removed = len(ranked.order) - len(after.order)
        moved = 0 if isinstance(rule, FilterRule) else _moved(ranked.order, after.order, context.k)
        effects.append(RuleEffect(rule.name, removed=removed, moved=moved))
        ranked = after
    return RuleOutcome(selected=ranked.order[: context.k], scores=ranked.scores, effects=effects)


def _field_path(location: Sequence[int | str]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def invalid_rules(error: ValidationError, prefix: str = "rules") -> InvalidArgument:
    """The first problem of a rules validation as INVALID_ARGUMENT naming the request field."""
    first = error.errors()[0]
    path = prefix + _field_path([part for part in first["loc"] if not str(part).startswith("function-")])
    message = str(first["msg"]).removeprefix("Value error, ")
    return InvalidArgument(f"{path}: {message} (got {first.get('input')!r})", field=path)


def parse_overrides(fields: dict[str, Any]) -> RulesOverrides:
    """Per-request rule overrides from plain values; INVALID_ARGUMENT naming the field if bad."""
    try:
        return RulesOverrides.model_validate(fields)
    except ValidationError as error:
        raise invalid_rules(error) from error


def merge_rules(base: RulesSettings, overrides: Sequence[RulesOverrides]) -> RulesSettings:
    """``base`` with each of ``overrides`` applied in turn (surface, variant, request)."""
    merged = base
    for override in overrides:
        try:
            merged = merged.merged(override)
        except ValidationError as error:
            raise invalid_rules(error) from error
    return merged
