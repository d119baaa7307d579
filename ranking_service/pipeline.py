"""The recommendation request path: retrieve -> features -> score -> rules -> explain.

Each stage is a component with typed input and output; training reuses the first
two (:class:`CandidateStage` and :class:`FeatureBuilder`) so the ranker learns on
exactly what serving computes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ranking_service.artifact import LoadedRanker
from ranking_service.candidates import (
    NO_REQUEST,
    CandidateRequest,
    CandidateStage,
    RetrievedSet,
    joined_candidates,
)
from ranking_service.experiments import assign
from ranking_service.explain import Contribution, explanations, reasons
from ranking_service.features import (
    MAX_HISTORY_FOR_FEATURES,
    CandidateSet,
    FeatureBuilder,
    FeatureMatrix,
    RequestContext,
)
from ranking_service.fresh_items import FreshItems
from ranking_service.online import OnlineUserState, with_online_events
from ranking_service.retrieval_client import CandidateSource
from ranking_service.rules import Candidates, RuleContext, RuleEffect, apply_chain, build_chain, merge_rules
from ranking_service.scoring import RankerModel, Scorer, in_retrieval_order
from ranking_service.store import UserHistory
from shared.config import RankingSettings, RulesOverrides, RulesSettings
from shared.data import DEVICES
from shared.errors import InvalidArgument
from shared.proto.vitrine.v1 import catalog_pb2
from shared.telemetry import CANDIDATES, DEGRADED, PARTIAL, STAGE_LATENCY

# The label under which this service's metrics are recorded.
RANKING_SERVICE = "vitrine.v1.Ranking"

MAX_SESSION_ITEMS = 50
# allowed_brands: the best-selling items of those brands that join the candidates, x k
# (retrieval's candidates may hold few or none of a surface's house brands).
ALLOWED_BRAND_BACKFILL = 3
# Popular items are scanned for allowed brands this many at a time.
BACKFILL_SCAN = 8192
MAX_ID_CHARS = 256
# 3000-01-01: anything later is a unit mistake (milliseconds sent as seconds).
MAX_TIMESTAMP = 32_503_680_000


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int
    timestamp: int  # 0: now
    device: str
    session_item_ids: Sequence[str]
    exclude_item_ids: Sequence[str]
    # Which configured rules apply ("": the default), this request's changes to them, and
    # whether to fill explanations.
    surface: str = ""
    rules: RulesOverrides | None = None
    explain: bool = False
    # Declared tastes (used when the user has no history and no session) and a filter.
    preferences: catalog_pb2.DeclaredPreferences | None = None
    item_filter: catalog_pb2.ItemFilter | None = None


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    reason: str
    title: str
    brand: str
    category: str
    price: float
    # The candidate sources that proposed it ("pin" for a pinned item retrieval did not).
    sources: tuple[str, ...] = ()
    # Only with explain = true.
    explained: bool = False
    anchor_item_ids: tuple[str, ...] = ()
    contributions: tuple[Contribution, ...] = ()


@dataclass(frozen=True)
class Recommendation:
    items: list[RecommendedItem]
    model_version: str
    index_version: str
    cold_start: bool
    degraded_reason: str
    partial_reason: str
    stage_ms: dict[str, float]
    # The request time (unix seconds) and the returned items' feature rows (FEATURE_NAMES
    # order), for the impression log.
    timestamp: int = 0
    feature_values: npt.NDArray[np.float32] | None = None
    # Every rule that ran, in order.
    rule_effects: list[RuleEffect] = field(default_factory=list)
    # The experiment variant ("" = control) and the candidate mix it asks retrieval for.
    variant: str = ""
    candidate_mix: dict[str, float] = field(default_factory=dict)

    @property
    def removed_by_rules(self) -> dict[str, int]:
        return {effect.rule: effect.removed for effect in self.rule_effects}


class RankingPipeline:
    def __init__(
        self,
        ranker: LoadedRanker,
        retrieval: CandidateSource,
        settings: RankingSettings,
        online: OnlineUserState | None = None,
        pinned_models: dict[str, RankerModel] | None = None,
    ) -> None:
        # Room for items upserted into the index after this snapshot (Candidate.fresh_item).
        self.fresh = FreshItems(ranker.items, ranker.item_row, ranker.stats, settings.fresh_items)
        ranker = dataclasses.replace(
            ranker, items=self.fresh.items, item_row=self.fresh.item_row, stats=self.fresh.stats
        )
        self.ranker = ranker
        # Events LogEvents stored since the snapshot (shared across artifact swaps).
        self._online = online
        self._settings = settings
        self._candidates = CandidateStage(
            ranker.items,
            ranker.item_row,
            ranker.stats.popular_rows,
            retrieval,
            settings,
            self.fresh,
            popular_candidates=ranker.popular_candidates,
        )
        self._features = FeatureBuilder(ranker.items, ranker.stats)
        self._brand_code = {
            str(brand): int(code)
            for brand, code in zip(ranker.items.brands.tolist(), ranker.items.brand_codes.tolist(), strict=True)
        }
        self.scorer = Scorer(ranker.model, ranker.model_path, settings.predict_threads, settings.compiled_trees)
        # Experiment variants that pin another ranker version: its trees, by version.
        self._pinned_models = dict(pinned_models or {})
        self._pinned_scorers = {
            version: Scorer(model, None, settings.predict_threads, compiled=False)
            for version, model in self._pinned_models.items()
        }

    # -- validation ---------------------------------------------------------------
    def validate(self, query: RecommendQuery) -> None:
        if not query.user_id:
            raise InvalidArgument(
                "user_id is empty; pass the caller's user id (any id; unknown ids get popular items)", field="user_id"
            )
        if len(query.user_id) > MAX_ID_CHARS:
            raise InvalidArgument(
                f"user_id has {len(query.user_id)} characters; at most {MAX_ID_CHARS}", field="user_id"
            )
        if not 1 <= query.k <= self._settings.max_k:
            raise InvalidArgument(f"k must be between 1 and {self._settings.max_k}, got {query.k}", field="k")
        if len(query.exclude_item_ids) > self._settings.max_exclusions:
            raise InvalidArgument(
                f"exclude_item_ids has {len(query.exclude_item_ids)} ids; at most {self._settings.max_exclusions}",
                field="exclude_item_ids",
            )
        if len(query.session_item_ids) > MAX_SESSION_ITEMS:
            raise InvalidArgument(
                f"context.session_item_ids has {len(query.session_item_ids)} ids; send the last {MAX_SESSION_ITEMS}",
                field="context.session_item_ids",
            )
        if query.preferences is not None and not (query.preferences.brands or query.preferences.categories):
            raise InvalidArgument(
                "preferences name no brand and no category; declare at least one", field="preferences"
            )
        if not 0 <= query.timestamp <= MAX_TIMESTAMP:
            raise InvalidArgument(
                f"context.timestamp must be unix seconds in 0..{MAX_TIMESTAMP} (0 = now), got {query.timestamp}",
                field="context.timestamp",
            )
        for number, pin in enumerate((query.rules.pins or []) if query.rules else []):
            if pin.item_id not in self.ranker.item_row:
                raise InvalidArgument(
                    f"rules.pins[{number}].item_id: unknown item {pin.item_id!r}", field=f"rules.pins[{number}].item_id"
                )

    def rules_for(self, query: RecommendQuery, variant_rules: RulesOverrides | None) -> RulesSettings:
        """The configured rules, then the surface's, the variant's and the request's changes."""
        layers = [
            self._settings.surfaces.get(query.surface),
            variant_rules,
            query.rules,
        ]
        return merge_rules(self._settings.rules, [layer for layer in layers if layer is not None])

    def _allowed_brand_rows(self, brands: Sequence[str], k: int) -> npt.NDArray[np.int32]:
        """The most popular in-stock items of ``brands``, at most ALLOWED_BRAND_BACKFILL x k."""
        items = self.ranker.items
        codes = [self._brand_code[brand] for brand in brands if brand in self._brand_code]
        popular = self.ranker.stats.popular_rows
        wanted = ALLOWED_BRAND_BACKFILL * k
        found: list[npt.NDArray[np.int32]] = []
        for start in range(0, len(popular) if codes else 0, BACKFILL_SCAN):
            chunk = popular[start : start + BACKFILL_SCAN]
            found.append(chunk[np.isin(items.brand_codes[chunk], codes) & (items.stock[chunk] > 0)])
            if sum(len(rows) for rows in found) >= wanted:
                break
        return np.concatenate(found)[:wanted].astype(np.int32) if found else np.zeros(0, np.int32)

    def _with_curated(self, candidates: CandidateSet, rules: RulesSettings, k: int) -> CandidateSet:
        """Pinned items, and for allowed_brands the popular items of those brands, join the
        candidates when retrieval did not propose them (scored, then filtered like the rest)."""
        row_of = self.ranker.item_row
        pinned = np.asarray([row_of[pin.item_id] for pin in rules.pins if pin.item_id in row_of], dtype=np.int32)
        backfill = self._allowed_brand_rows(rules.allowed_brands, k) if rules.allowed_brands else pinned[:0]
        backfill = backfill[~np.isin(backfill, pinned)]
        extra = np.concatenate([pinned, backfill])
        zeros = np.zeros(len(extra), np.float32)
        curated = CandidateSet(
            rows=extra,
            retrieval_scores=zeros,
            content_scores=zeros,
            collaborative_scores=zeros,
            from_popular=False,
            sources=[("pin",)] * len(pinned) + [("popular",)] * len(backfill),
            stock=self.ranker.items.stock[extra],
        )
        return joined_candidates(candidates, curated)

    def _rows(self, item_ids: Sequence[str]) -> npt.NDArray[np.int32]:
        row_of = self.ranker.item_row
        return np.asarray([row_of[i] for i in item_ids if i in row_of], dtype=np.int32)

    # -- stage 1: candidates ----------------------------------------------------------
    def retrieve(
        self,
        user_id: str,
        history: UserHistory,
        context: RequestContext,
        excluded: npt.NDArray[np.int32],
        timeout_s: float,
        request: CandidateRequest = NO_REQUEST,
    ) -> RetrievedSet:
        return self._candidates.retrieve(user_id, history, context, excluded, timeout_s, request)

    # -- stage 2: features ------------------------------------------------------------
    def features(self, history: UserHistory, context: RequestContext, candidates: CandidateSet) -> FeatureMatrix:
        return self._features.build(history, context, candidates)

    # -- stage 3: score -------------------------------------------------------------------
    def score(self, features: FeatureMatrix) -> npt.NDArray[np.float32]:
        return self.scorer.predict(features.values)

    # -- the whole request -----------------------------------------------------------------
    def recommend(self, query: RecommendQuery, timeout_s: float) -> Recommendation:
        self.validate(query)
        started = time.perf_counter()
        stage_ms: dict[str, float] = {}

        def lap(stage: str) -> None:
            nonlocal started
            now = time.perf_counter()
            stage_ms[stage] = round((now - started) * 1000.0, 3)
            STAGE_LATENCY.labels(RANKING_SERVICE, stage).observe(now - started)
            started = now

        timestamp = query.timestamp or int(time.time())
        context = RequestContext(
            timestamp=timestamp,
            device=query.device if query.device in DEVICES else "",
            session_rows=self._rows(query.session_item_ids),
        )
        history = with_online_events(
            self._online,
            query.user_id,
            self.ranker.histories.history(query.user_id, before=timestamp + 1, limit=None),
            self.ranker.item_row,
            self.ranker.snapshot_at,
            before=timestamp + 1,
        )
        excluded = self._rows(query.exclude_item_ids)
        cold_start = not len(history) and not len(context.session_rows)
        variant = assign(query.user_id, self._settings.experiments)
        rules = self.rules_for(query, variant.rules if variant else None)
        pinned_version = variant.model_version if variant else None
        scorer = self._pinned_scorers[pinned_version] if pinned_version else self.scorer
        model = self._pinned_models[pinned_version] if pinned_version else self.ranker.model

        retrieved = self.retrieve(
            query.user_id,
            history,
            context,
            excluded,
            timeout_s,
            CandidateRequest(
                query.preferences,
                query.item_filter,
                tuple((mix.source, mix.share) for mix in variant.candidate_mix) if variant else (),
                anchors=query.explain,
            ),
        )
        lap("retrieve")
        CANDIDATES.labels(RANKING_SERVICE).observe(len(retrieved.candidates.rows))
        if retrieved.degraded_reason:
            DEGRADED.labels(RANKING_SERVICE, retrieved.degraded_reason).inc()
        if retrieved.partial_reason:
            PARTIAL.labels(RANKING_SERVICE, retrieved.partial_reason).inc()
        candidates = (
            self._with_curated(retrieved.candidates, rules, query.k)
            if rules.pins or rules.allowed_brands
            else retrieved.candidates
        )
        features = self.features(history, context, candidates)
        lap("features")
        scores = scorer.predict(features.values)
        if cold_start and not model.ranks_cold_start:
            scores = in_retrieval_order(scores)
        lap("predict")
        rows = candidates.rows
        items = self.ranker.items
        outcome = apply_chain(
            build_chain(rules, self.ranker.item_row),
            Candidates(rows, scores, candidates.stock if candidates.stock is not None else items.stock[rows]),
            RuleContext(items, history, context.session_rows, excluded, timestamp, query.k),
        )
        explained = reasons(features, outcome.selected, rows, items)
        lap("rules")
        details = (
            explanations(
                model,
                features,
                outcome.selected,
                candidates,
                np.concatenate([context.session_rows, history.recent(MAX_HISTORY_FOR_FEATURES).item_rows]),
                items,
                self.ranker.stats,
                self._settings.predict_threads,
            )
            if query.explain
            else []
        )
        if query.explain:
            lap("explain")
        recommended = [
            RecommendedItem(
                item_id=str(items.item_ids[rows[position]]),
                score=float(outcome.scores[position]),
                reason=reason,
                title=str(items.titles[rows[position]]),
                brand=str(items.brands[rows[position]]),
                category=str(items.categories[rows[position]]),
                price=float(items.prices[rows[position]]),
                sources=candidates.sources[position] if len(candidates.sources) > position else (),
                explained=query.explain,
                anchor_item_ids=tuple(str(items.item_ids[r]) for r in details[line].anchor_rows) if details else (),
                contributions=details[line].contributions if details else (),
            )
            for line, (position, reason) in enumerate(zip(outcome.selected.tolist(), explained, strict=True))
        ]
        return Recommendation(
            items=recommended,
            model_version=pinned_version or self.ranker.version,
            index_version=retrieved.index_version,
            cold_start=cold_start,
            degraded_reason=retrieved.degraded_reason,
            partial_reason=retrieved.partial_reason,
            stage_ms=stage_ms,
            timestamp=timestamp,
            feature_values=features.values[outcome.selected],
            rule_effects=outcome.effects,
            variant=variant.name if variant else "",
            candidate_mix={mix.source: mix.share for mix in variant.candidate_mix} if variant else {},
        )
