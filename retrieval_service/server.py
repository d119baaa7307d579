"""The retrieval gRPC server: Retrieve, SimilarItems and QueryVector over the loaded index (or shard)."""

from __future__ import annotations

import logging

import faiss
import grpc
import numpy as np
from threadpoolctl import threadpool_limits

from retrieval_service.artifact import load_index_artifact
from retrieval_service.retriever import (
    Candidates,
    ItemFilterSpec,
    Preferences,
    QueryOptions,
    QueryPart,
    Retriever,
    TextQueryEncoder,
)
from retrieval_service.shards import shard_artifact_name
from shared.artifacts import ArtifactError, current_version
from shared.config import EmbeddingSettings, RetrievalSettings
from shared.errors import InvalidArgument, Unimplemented, grpc_errors
from shared.grpc_server import RunningServer, start_server
from shared.proto.vitrine.v1 import catalog_pb2, retrieval_pb2, retrieval_pb2_grpc
from shared.reloading import Reloadable

log = logging.getLogger(__name__)

SERVICE_NAME = "vitrine.v1.Retrieval"


def _response(candidates: Candidates) -> retrieval_pb2.RetrieveResponse:
    return retrieval_pb2.RetrieveResponse(
        candidates=[
            retrieval_pb2.Candidate(
                item_id=item_id,
                score=score,
                source=source,
                content_score=content,
                collaborative_score=collaborative,
                sources=sources,
                source_scores=source_scores,
                anchor_item_ids=anchors,
                stock=stock,
            )
            for item_id, score, content, collaborative, source, sources, source_scores, anchors, stock in zip(
                candidates.item_ids,
                candidates.scores,
                candidates.content_scores,
                candidates.collaborative_scores,
                candidates.primary_sources,
                candidates.sources,
                candidates.source_scores,
                candidates.anchors,
                candidates.stock,
                strict=True,
            )
        ],
        index_version=candidates.index_version,
        dimension=candidates.dimension,
        shard=candidates.shard,
        shard_count=candidates.shard_count,
    )


def item_filter(message: catalog_pb2.ItemFilter) -> ItemFilterSpec | None:
    spec = ItemFilterSpec(
        categories=list(message.categories),
        brands=list(message.brands),
        price_min=message.price_min if message.HasField("price_min") else None,
        price_max=message.price_max if message.HasField("price_max") else None,
        in_stock_only=message.in_stock_only,
    )
    return None if spec.empty else spec


def preferences(message: catalog_pb2.DeclaredPreferences) -> Preferences:
    return Preferences(
        brands=list(message.brands),
        categories=list(message.categories),
        price_min=message.price_min if message.HasField("price_min") else None,
        price_max=message.price_max if message.HasField("price_max") else None,
    )


def _query_vector_response(part: QueryPart) -> retrieval_pb2.QueryVectorResponse:
    return retrieval_pb2.QueryVectorResponse(
        partial=retrieval_pb2.FloatVector(values=part.vector.tolist()),
        known=part.known,
        index_version=part.index_version,
        dimension=part.dimension,
        shard=part.shard,
        shard_count=part.shard_count,
    )


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(self, served: Reloadable[Retriever]) -> None:
        # Each request takes the current retriever once: a hot swap never changes it mid-request.
        self._served = served

    @grpc_errors
    def Retrieve(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        retriever = self._served.get()
        exclude = list(request.exclude_item_ids)
        options = QueryOptions(
            filter=item_filter(request.filter) if request.HasField("filter") else None,
            mix=[(quota.source, quota.share) for quota in request.mix],
            session_item_ids=list(request.session_item_ids),
        )
        query = request.WhichOneof("query")
        if query == "user_id":
            candidates = retriever.by_user(request.user_id, request.n, exclude, options)
        elif query == "history":
            candidates = retriever.by_history(
                list(request.history.item_ids), list(request.history.weights), request.n, exclude, options
            )
        elif query == "vector":
            candidates = retriever.by_vector(list(request.vector.values), request.n, exclude, options)
        elif query == "text":
            candidates = retriever.by_text(request.text, request.n, exclude, options)
        elif query == "preferences":
            candidates = retriever.by_preferences(preferences(request.preferences), request.n, exclude, options)
        else:
            raise InvalidArgument("set one query: user_id, history, vector, text or preferences", field="query")
        return _response(candidates)

    @grpc_errors
    def SimilarItems(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        retriever = self._served.get()
        spec = item_filter(request.filter) if request.HasField("filter") else None
        return _response(retriever.similar_items(request.item_id, request.n, list(request.exclude_item_ids), spec))

    @grpc_errors
    def QueryVector(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.QueryVectorRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.QueryVectorResponse:
        retriever = self._served.get()
        query = request.WhichOneof("query")
        if query == "user_id":
            return _query_vector_response(retriever.user_part(request.user_id))
        if query == "history":
            return _query_vector_response(
                retriever.history_part(list(request.history.item_ids), list(request.history.weights))
            )
        raise InvalidArgument("set one query: user_id or history", field="query")

    @grpc_errors
    def UpsertItems(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.UpsertItemsRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.CatalogUpdateResponse:
        raise Unimplemented("UpsertItems is not served by this version yet")

    @grpc_errors
    def DeleteItems(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.DeleteItemsRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.CatalogUpdateResponse:
        raise Unimplemented("DeleteItems is not served by this version yet")

    @grpc_errors
    def UpdateStock(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.UpdateStockRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.CatalogUpdateResponse:
        raise Unimplemented("UpdateStock is not served by this version yet")


def load_text_encoder(settings: EmbeddingSettings) -> TextQueryEncoder:
    from shared.embeddings import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(settings)
    return TextQueryEncoder(encode=lambda text: embedder.encode([text])[0], model_id=embedder.model_id)


def start_retrieval_server(settings: RetrievalSettings, embedding: EmbeddingSettings) -> RunningServer:
    """Serve the current index artifact (or one shard of it); returns once SERVING (NOT_SERVING while loading)."""
    faiss.omp_set_num_threads(settings.search_threads)
    # numpy's BLAS too (the exact re-score): two BLAS threads per request on 2 shared cores
    # made a 5000 x 448 product 4-8x slower than one.
    threadpool_limits(limits=settings.search_threads, user_api="blas")
    text_encoder: list[TextQueryEncoder | None] = []
    artifact_name = shard_artifact_name(settings.index_name, settings.shard, settings.shards)

    def load(version: str | None) -> Retriever:
        if not text_encoder:  # loaded once, with the first index, before SERVING
            text_encoder.append(load_text_encoder(embedding) if settings.text_queries else None)
        loaded = load_index_artifact(
            settings.artifacts, settings.nprobe, artifact_name, version, refine_factor=settings.refine_factor
        )
        if (loaded.shard, loaded.shard_count) != (settings.shard, settings.shards):
            # A shard answering for another shard's items would corrupt every merged answer.
            raise ArtifactError(
                f"{artifact_name}/{loaded.version} holds shard {loaded.shard} of {loaded.shard_count}, "
                f"but this server is configured for shard {settings.shard} of {settings.shards}"
            )
        retriever = Retriever(
            loaded,
            settings.max_candidates,
            settings.max_exclusions,
            text_encoder[0],
            mix=settings.sources,
            exact_filter_below=settings.exact_filter_below,
            preference_items=settings.preference_items,
        )
        # One search before serving: the first caller should not pay for page faults.
        retriever.by_vector(np.ones(loaded.index.dimension, np.float32).tolist(), 1, [])
        return retriever

    served = Reloadable(
        SERVICE_NAME,
        artifact_name,
        load,
        lambda retriever: retriever.loaded.version,
        lambda: current_version(settings.artifacts, artifact_name),
    )
    return start_server(
        SERVICE_NAME,
        lambda server: retrieval_pb2_grpc.add_RetrievalServicer_to_server(RetrievalServicer(served), server),
        settings,
        served,
    )
