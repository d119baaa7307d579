"""The ranking gRPC server: Recommend."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
from threadpoolctl import threadpool_limits

from ranking_service.artifact import DEFAULT_NAME as RANKER_ARTIFACT
from ranking_service.artifact import load_ranker_artifact
from ranking_service.experiments import load_pinned_boosters
from ranking_service.pipeline import RANKING_SERVICE, RankingPipeline, RecommendedItem, RecommendQuery
from ranking_service.retrieval_client import CandidateSource, RetrievalClient, ShardedRetrievalClient
from ranking_service.rules import parse_overrides
from shared.artifacts import current_version
from shared.config import RankingSettings, RulesOverrides
from shared.errors import Unimplemented, grpc_errors
from shared.grpc_server import RunningServer, start_server
from shared.logs import event
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc
from shared.reloading import Reloadable

log = logging.getLogger(__name__)

SERVICE_NAME = RANKING_SERVICE
DEVICE_NAMES = {
    ranking_pb2.DEVICE_WEB: "web",
    ranking_pb2.DEVICE_IOS: "ios",
    ranking_pb2.DEVICE_ANDROID: "android",
}
# Time kept back from the caller's deadline for features, scoring and the reply.
OWN_BUDGET_S = 0.02
EVENT_TYPE_NAMES = {
    ranking_pb2.EVENT_TYPE_VIEW: "view",
    ranking_pb2.EVENT_TYPE_CART: "cart",
    ranking_pb2.EVENT_TYPE_PURCHASE: "purchase",
    ranking_pb2.EVENT_TYPE_WISHLIST: "wishlist",
}


def rule_overrides(request: ranking_pb2.RecommendRequest) -> RulesOverrides | None:
    """The request's RuleOverrides as settings (unset fields and empty lists keep the
    configuration); INVALID_ARGUMENT naming the field for a bad value."""
    if not request.HasField("rules"):
        return None
    rules = request.rules
    fields: dict[str, Any] = {}
    if rules.exclude_seen_types:
        fields["exclude_seen_types"] = [EVENT_TYPE_NAMES.get(t, f"unspecified ({t})") for t in rules.exclude_seen_types]
    for name in ("exclude_seen_window_days", "exclude_out_of_stock", "mmr_lambda", "max_per_brand", "max_per_category"):
        if rules.HasField(name):
            fields[name] = getattr(rules, name)
    if rules.pins:
        fields["pins"] = [{"item_id": pin.item_id, "position": pin.position} for pin in rules.pins]
    if rules.boosts:
        boosts: list[dict[str, Any]] = []
        for boost in rules.boosts:
            target = boost.WhichOneof("target")
            boosts.append({"multiplier": boost.multiplier, **({target: getattr(boost, target)} if target else {})})
        fields["boosts"] = boosts
    if rules.allowed_brands:
        fields["allowed_brands"] = list(rules.allowed_brands)
    return parse_overrides(fields) if fields else None


def _item_message(item: RecommendedItem) -> ranking_pb2.RecommendedItem:
    message = ranking_pb2.RecommendedItem(
        item_id=item.item_id,
        score=item.score,
        reason=item.reason,
        title=item.title,
        brand=item.brand,
        category=item.category,
        price=item.price,
        sources=list(item.sources),
    )
    if item.explained:
        message.explanation.CopyFrom(
            ranking_pb2.Explanation(
                anchor_item_ids=list(item.anchor_item_ids),
                contributions=[
                    ranking_pb2.FeatureContribution(feature=c.feature, contribution=c.contribution, text=c.text)
                    for c in item.contributions
                ],
            )
        )
    return message


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    def __init__(self, served: Reloadable[RankingPipeline], settings: RankingSettings) -> None:
        # Each request takes the current pipeline once: a hot swap never changes it mid-request.
        self._served = served
        self._settings = settings

    def _retrieval_timeout(self, context: grpc.ServicerContext) -> float:
        """What is left of the caller's deadline minus our own budget; <= 0 means use the fallback."""
        remaining = context.time_remaining()
        timeout = self._settings.retrieval_timeout_s
        if remaining is not None:
            timeout = min(timeout, remaining - OWN_BUDGET_S)
        return timeout

    @grpc_errors
    def Recommend(  # noqa: N802 (gRPC method name)
        self, request: ranking_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.RecommendResponse:
        request_id = uuid.uuid4().hex
        query = RecommendQuery(
            user_id=request.user_id,
            k=request.k,
            timestamp=request.context.timestamp,
            device=DEVICE_NAMES.get(request.context.device, ""),
            session_item_ids=list(request.context.session_item_ids),
            exclude_item_ids=list(request.exclude_item_ids),
            surface=request.surface,
            rules=rule_overrides(request),
            explain=request.explain,
        )
        pipeline = self._served.get()
        result = pipeline.recommend(query, self._retrieval_timeout(context))
        event(
            log,
            "recommend",
            request_id=request_id,
            user_id=request.user_id,
            k=request.k,
            returned=len(result.items),
            cold_start=result.cold_start,
            degraded=result.degraded_reason or None,
            partial=result.partial_reason or None,
            model_version=result.model_version,
            index_version=result.index_version,
            surface=request.surface or None,
            surface_configured=request.surface in self._settings.surfaces if request.surface else None,
            rule_effects=[[e.rule, e.removed, e.moved] for e in result.rule_effects],
            variant=result.variant,
            candidate_mix=result.candidate_mix or None,
            explain=request.explain,
            stage_ms=result.stage_ms,
        )
        return ranking_pb2.RecommendResponse(
            items=[_item_message(item) for item in result.items],
            request_id=request_id,
            model_version=result.model_version,
            index_version=result.index_version,
            cold_start=result.cold_start,
            degraded=bool(result.degraded_reason),
            partial=bool(result.partial_reason),
            rule_effects=[
                ranking_pb2.RuleEffect(rule=e.rule, removed=e.removed, moved=e.moved) for e in result.rule_effects
            ],
            variant=result.variant,
        )

    @grpc_errors
    def LogEvents(  # noqa: N802 (gRPC method name)
        self, request: ranking_pb2.LogEventsRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.LogEventsResponse:
        raise Unimplemented("LogEvents is not served by this version yet")


def start_ranking_server(settings: RankingSettings) -> RunningServer:
    """Serve the current ranker artifact; returns once SERVING (NOT_SERVING while loading)."""
    # One BLAS thread per request (feature similarities): concurrent requests use the cores.
    threadpool_limits(limits=settings.predict_threads, user_api="blas")
    retrieval: CandidateSource
    if settings.retrieval_shards:
        retrieval = ShardedRetrievalClient(
            settings.retrieval_shards,
            settings.retrieval_query_share,
            SERVICE_NAME,
            settings.max_message_bytes,
            settings.retrieval_tls,
            settings.retrieval_token,
            settings.retrieval_lb_policy,
        )
    else:
        retrieval = RetrievalClient(
            settings.retrieval_target,
            settings.max_message_bytes,
            settings.retrieval_tls,
            settings.retrieval_token,
            settings.retrieval_lb_policy,
        )

    def load(version: str | None) -> RankingPipeline:
        return RankingPipeline(
            load_ranker_artifact(settings.artifacts, version=version),
            retrieval,
            settings,
            load_pinned_boosters(settings.artifacts, settings.experiments),
        )

    served = Reloadable(
        SERVICE_NAME,
        RANKER_ARTIFACT,
        load,
        lambda pipeline: pipeline.ranker.version,
        lambda: current_version(settings.artifacts, RANKER_ARTIFACT),
    )
    return start_server(
        SERVICE_NAME,
        lambda server: ranking_pb2_grpc.add_RankingServicer_to_server(RankingServicer(served, settings), server),
        settings,
        served,
    )
