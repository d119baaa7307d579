"""The ranking gRPC server: Recommend."""

from __future__ import annotations

import logging
import uuid

import grpc
from threadpoolctl import threadpool_limits

from ranking_service.artifact import DEFAULT_NAME as RANKER_ARTIFACT
from ranking_service.artifact import load_ranker_artifact
from ranking_service.pipeline import RANKING_SERVICE, RankingPipeline, RecommendQuery
from ranking_service.retrieval_client import CandidateSource, RetrievalClient, ShardedRetrievalClient
from shared.artifacts import current_version
from shared.config import RankingSettings
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
            removed_by_rules=result.removed_by_rules,
            stage_ms=result.stage_ms,
        )
        return ranking_pb2.RecommendResponse(
            items=[
                ranking_pb2.RecommendedItem(
                    item_id=item.item_id,
                    score=item.score,
                    reason=item.reason,
                    title=item.title,
                    brand=item.brand,
                    category=item.category,
                    price=item.price,
                )
                for item in result.items
            ],
            request_id=request_id,
            model_version=result.model_version,
            index_version=result.index_version,
            cold_start=result.cold_start,
            degraded=bool(result.degraded_reason),
            partial=bool(result.partial_reason),
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
        return RankingPipeline(load_ranker_artifact(settings.artifacts, version=version), retrieval, settings)

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
