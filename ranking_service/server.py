"""The ranking gRPC server: Recommend and LogEvents."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import grpc
from threadpoolctl import threadpool_limits

from ranking_service.artifact import DEFAULT_NAME as RANKER_ARTIFACT
from ranking_service.artifact import load_ranker_artifact
from ranking_service.capture import CaptureWriter
from ranking_service.experiments import load_pinned_models
from ranking_service.online import OnlineEvent, OnlineStateUnavailable, OnlineUserState, online_user_state
from ranking_service.pipeline import (
    MAX_ID_CHARS,
    MAX_TIMESTAMP,
    RANKING_SERVICE,
    RankingPipeline,
    Recommendation,
    RecommendedItem,
    RecommendQuery,
)
from ranking_service.retrieval_client import CandidateSource, RetrievalClient, ShardedRetrievalClient
from ranking_service.rules import parse_overrides
from shared.artifacts import current_version
from shared.config import RankingSettings, RulesOverrides
from shared.data import CART, PURCHASE, VIEW, WISHLIST
from shared.errors import InvalidArgument, Unavailable, grpc_errors
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
EVENT_CODES = {
    ranking_pb2.EVENT_TYPE_VIEW: VIEW,
    ranking_pb2.EVENT_TYPE_CART: CART,
    ranking_pb2.EVENT_TYPE_PURCHASE: PURCHASE,
    ranking_pb2.EVENT_TYPE_WISHLIST: WISHLIST,
}
# Time kept back from the caller's deadline for features, scoring, rules and the reply: a
# share of what is left, at least the minimum (a fixed 20 ms was too little on a busy
# machine once rules and source features joined the request path).
OWN_BUDGET_SHARE = 0.2
OWN_BUDGET_MIN_S = 0.02
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
    def __init__(
        self,
        served: Reloadable[RankingPipeline],
        settings: RankingSettings,
        online: OnlineUserState,
        capture: CaptureWriter | None = None,
    ) -> None:
        # Each request takes the current pipeline once: a hot swap never changes it mid-request.
        self._served = served
        self._settings = settings
        self._online = online
        self._capture = capture

    def _retrieval_timeout(self, context: grpc.ServicerContext) -> float:
        """What is left of the caller's deadline minus our own budget; <= 0 means use the fallback."""
        remaining = context.time_remaining()
        timeout = self._settings.retrieval_timeout_s
        if remaining is not None:
            timeout = min(timeout, remaining - max(OWN_BUDGET_MIN_S, OWN_BUDGET_SHARE * remaining))
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
            preferences=request.preferences if request.HasField("preferences") else None,
            item_filter=request.filter if request.HasField("filter") else None,
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
        if self._capture is not None:
            self._capture.impression(impression_record(request_id, request.user_id, request.surface, result))
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
        events = validated_events(request, self._settings.max_events_per_batch, int(time.time()))
        item_row = self._served.get().ranker.item_row
        unknown = sum(1 for online_event in events if online_event.item_id not in item_row)
        try:
            self._online.append(events)
        except OnlineStateUnavailable as error:
            raise Unavailable(f"{error}; the batch was not acknowledged, retry it") from error
        if self._capture is not None:
            self._capture.events([event_record(online_event) for online_event in events])
        event(log, "events logged", accepted=len(events), unknown_items=unknown)
        return ranking_pb2.LogEventsResponse(accepted=len(events), unknown_items=unknown)


def validated_events(request: ranking_pb2.LogEventsRequest, max_events: int, now: int) -> list[OnlineEvent]:
    """The batch as online events, or InvalidArgument naming the first bad event's field."""
    if len(request.events) > max_events:
        raise InvalidArgument(f"events has {len(request.events)} events; at most {max_events} per call", field="events")
    events: list[OnlineEvent] = []
    for index, user_event in enumerate(request.events):
        where = f"events[{index}]"
        for name, value in (("user_id", user_event.user_id), ("item_id", user_event.item_id)):
            if not value:
                raise InvalidArgument(f"{where}.{name} is empty", field=f"{where}.{name}")
            if len(value) > MAX_ID_CHARS:
                raise InvalidArgument(
                    f"{where}.{name} has {len(value)} characters; at most {MAX_ID_CHARS}", field=f"{where}.{name}"
                )
        code = EVENT_CODES.get(user_event.type)
        if code is None:
            raise InvalidArgument(
                f"{where}.type is {user_event.type}; use VIEW, CART, PURCHASE or WISHLIST", field=f"{where}.type"
            )
        if not 0 <= user_event.timestamp <= MAX_TIMESTAMP:
            raise InvalidArgument(
                f"{where}.timestamp must be unix seconds in 0..{MAX_TIMESTAMP} (0 = now), got {user_event.timestamp}",
                field=f"{where}.timestamp",
            )
        if len(user_event.session_id) > MAX_ID_CHARS or len(user_event.request_id) > MAX_ID_CHARS:
            field = "session_id" if len(user_event.session_id) > MAX_ID_CHARS else "request_id"
            raise InvalidArgument(f"{where}.{field} has more than {MAX_ID_CHARS} characters", field=f"{where}.{field}")
        events.append(
            OnlineEvent(
                user_id=user_event.user_id,
                item_id=user_event.item_id,
                event_code=code,
                timestamp=user_event.timestamp or now,
                device=DEVICE_NAMES.get(user_event.device, ""),
                session_id=user_event.session_id,
                request_id=user_event.request_id,
            )
        )
    return events


def event_record(online_event: OnlineEvent) -> dict[str, Any]:
    return {"record": "event", "logged_at_ms": int(time.time() * 1000), **online_event.__dict__}


def impression_record(request_id: str, user_id: str, surface: str, result: Recommendation) -> dict[str, Any]:
    """One served answer for the impression log (feature rows in FEATURE_NAMES order)."""
    values = result.feature_values
    return {
        "record": "impression",
        "request_id": request_id,
        "user_id": user_id,
        "timestamp": result.timestamp,
        "served_at_ms": int(time.time() * 1000),
        "surface": surface,
        # The experiment variant ("" = control), so outcomes can be compared per variant.
        "variant": result.variant,
        "model_version": result.model_version,
        "index_version": result.index_version,
        "cold_start": result.cold_start,
        "degraded": bool(result.degraded_reason),
        "items": [
            {
                "item_id": item.item_id,
                "position": position,
                "score": item.score,
                "features": values[position].tolist() if values is not None else [],
            }
            for position, item in enumerate(result.items)
        ],
    }


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

    online = online_user_state(settings.online_state)
    capture = CaptureWriter(settings.capture) if settings.capture.enabled else None

    def load(version: str | None) -> RankingPipeline:
        return RankingPipeline(
            load_ranker_artifact(settings.artifacts, version=version),
            retrieval,
            settings,
            online,
            load_pinned_models(settings.artifacts, settings.experiments),
        )

    served = Reloadable(
        SERVICE_NAME,
        RANKER_ARTIFACT,
        load,
        lambda pipeline: pipeline.ranker.version,
        lambda: current_version(settings.artifacts, RANKER_ARTIFACT),
    )
    try:
        running = start_server(
            SERVICE_NAME,
            lambda server: ranking_pb2_grpc.add_RankingServicer_to_server(
                RankingServicer(served, settings, online, capture), server
            ),
            settings,
            served,
        )
    except BaseException:
        online.close()
        if capture is not None:
            capture.close()
        raise
    if capture is not None:
        running.on_stop.append(capture.close)
    running.on_stop.append(online.close)
    return running
