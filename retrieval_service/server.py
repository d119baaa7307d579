"""The retrieval gRPC server: Retrieve, SimilarItems and QueryVector over the loaded index (or shard)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from itertools import chain

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
from retrieval_service.update_log import update_log_store
from retrieval_service.updates import (
    LiveCatalog,
    open_live_catalog,
    read_params,
    validated_ids,
    validated_items,
    validated_levels,
)
from shared.artifacts import ArtifactError, current_version
from shared.config import CatalogUpdateSettings, EmbeddingSettings, RetrievalSettings
from shared.errors import FailedPrecondition, InvalidArgument, grpc_errors
from shared.grpc_server import RunningServer, start_server
from shared.proto.vitrine.v1 import catalog_pb2, retrieval_pb2, retrieval_pb2_grpc
from shared.reloading import Reloadable
from shared.security import BearerTokenInterceptor

log = logging.getLogger(__name__)

SERVICE_NAME = "vitrine.v1.Retrieval"
# The catalogue writes: they need the bearer token whenever one is configured (like Admin).
WRITE_METHODS = tuple(f"/{SERVICE_NAME}/{method}" for method in ("UpsertItems", "DeleteItems", "UpdateStock"))


class LiveCatalogs:
    """The live catalogue (write-ahead log + updates) of each loaded index version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_version: dict[str, LiveCatalog] = {}

    def get(self, version: str) -> LiveCatalog | None:
        return self._by_version.get(version)

    def seal_all(self) -> list[LiveCatalog]:
        with self._lock:
            catalogs = list(self._by_version.values())
        for catalog in catalogs:
            catalog.seal()
        return catalogs

    def close(self) -> None:
        with self._lock:
            catalogs, self._by_version = list(self._by_version.values()), {}
        for catalog in catalogs:
            catalog.close()

    def add(self, catalog: LiveCatalog, keep: int = 2) -> None:
        """Register ``catalog``; only the ``keep`` newest stay (the one being replaced keeps
        answering reads until the swap)."""
        with self._lock:
            self._by_version[catalog.version] = catalog
            while len(self._by_version) > keep:
                oldest = next(iter(self._by_version))
                self._by_version.pop(oldest).close()


def annotated(
    response: retrieval_pb2.RetrieveResponse, retriever: Retriever, catalogs: LiveCatalogs
) -> retrieval_pb2.RetrieveResponse:
    """The attributes of the candidates upserted since the build (the ranking service's
    snapshot does not know them)."""
    live = catalogs.get(retriever.loaded.version)
    if live is None:
        return response
    for candidate in response.candidates:
        fresh = live.fresh_item(candidate.item_id)
        if fresh is not None:
            candidate.fresh_item.CopyFrom(fresh.to_proto())
    return response


def _codes(values: Sequence[Sequence[str]], table: dict[str, int]) -> list[int]:
    """Every value of every list, flattened, as its position in ``table`` (new values added)."""
    return [table.setdefault(value, len(table)) for value in chain.from_iterable(values)]


def columnar_response(
    candidates: Candidates, retriever: Retriever, catalogs: LiveCatalogs
) -> retrieval_pb2.RetrieveResponse:
    """The answer as columns (RetrieveRequest.columnar): a few packed fields instead of one
    message per candidate, with the items upserted since the build annotated like
    :func:`annotated` does."""
    response = retrieval_pb2.RetrieveResponse(
        index_version=candidates.index_version,
        dimension=candidates.dimension,
        shard=candidates.shard,
        shard_count=candidates.shard_count,
    )
    columns = response.columns
    columns.SetInParent()  # an empty answer is still a columnar one
    columns.item_ids.extend(candidates.item_ids)
    columns.scores.extend(candidates.scores)
    columns.content_scores.extend(candidates.content_scores)
    columns.collaborative_scores.extend(candidates.collaborative_scores)
    columns.stock.extend(candidates.stock)
    sources: dict[str, int] = {}
    columns.primary_sources.extend(_codes([candidates.primary_sources], sources))
    columns.source_counts.extend([len(tags) for tags in candidates.sources])
    columns.sources.extend(_codes(candidates.sources, sources))
    columns.source_names.extend(sources)
    columns.source_scores.extend(chain.from_iterable(candidates.source_scores))
    anchors: dict[str, int] = {}
    columns.anchor_counts.extend([len(items) for items in candidates.anchors])
    columns.anchors.extend(_codes(candidates.anchors, anchors))
    columns.anchor_item_ids.extend(anchors)
    live = catalogs.get(retriever.loaded.version)
    if live is not None:
        for position, item_id in enumerate(candidates.item_ids):
            fresh = live.fresh_item(item_id)
            if fresh is not None:
                columns.fresh_positions.append(position)
                columns.fresh_items.append(fresh.to_proto())
    return response


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
    def __init__(
        self,
        served: Reloadable[Retriever],
        catalogs: LiveCatalogs | None = None,
        updates: CatalogUpdateSettings | None = None,
    ) -> None:
        # Each request takes the current retriever once: a hot swap never changes it mid-request.
        self._served = served
        self._catalogs = catalogs or LiveCatalogs()
        self._updates = updates or CatalogUpdateSettings()

    def _live(self) -> LiveCatalog:
        version = self._served.get().loaded.version
        live = self._catalogs.get(version)
        if live is None:
            raise FailedPrecondition(f"index version {version} takes no catalogue updates on this server")
        return live

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
            with_anchors=not request.without_anchors,
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
        if request.columnar:
            return columnar_response(candidates, retriever, self._catalogs)
        return annotated(_response(candidates), retriever, self._catalogs)

    @grpc_errors
    def SimilarItems(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        retriever = self._served.get()
        spec = item_filter(request.filter) if request.HasField("filter") else None
        return annotated(
            _response(retriever.similar_items(request.item_id, request.n, list(request.exclude_item_ids), spec)),
            retriever,
            self._catalogs,
        )

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
        items = validated_items(request.items, self._updates.max_batch, int(time.time()))
        return self._live().upsert(items).to_proto()

    @grpc_errors
    def DeleteItems(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.DeleteItemsRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.CatalogUpdateResponse:
        item_ids = validated_ids(request.item_ids, "item_ids", self._updates.max_batch)
        return self._live().delete(item_ids).to_proto()

    @grpc_errors
    def UpdateStock(  # noqa: N802 (gRPC method name)
        self, request: retrieval_pb2.UpdateStockRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.CatalogUpdateResponse:
        levels = validated_levels(request.levels, self._updates.max_batch)
        return self._live().update_stock(levels).to_proto()


def load_text_encoder(settings: EmbeddingSettings) -> TextQueryEncoder:
    from shared.embeddings import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(settings)
    return TextQueryEncoder(encode=lambda text: embedder.encode([text])[0], model_id=embedder.model_id)


def start_retrieval_server(
    settings: RetrievalSettings, embedding: EmbeddingSettings, text_encoder: TextQueryEncoder | None = None
) -> RunningServer:
    """Serve the current index artifact (or one shard of it); returns once SERVING (NOT_SERVING while loading).

    ``text_encoder``: use this encoder instead of loading the configured text model (tests
    pass a small real embedder); only when ``settings.text_queries`` is on.
    """
    faiss.omp_set_num_threads(settings.search_threads)
    # numpy's BLAS too (the exact re-score): two BLAS threads per request on 2 shared cores
    # made a 5000 x 448 product 4-8x slower than one.
    threadpool_limits(limits=settings.search_threads, user_api="blas")
    encoders: list[TextQueryEncoder | None] = []
    artifact_name = shard_artifact_name(settings.index_name, settings.shard, settings.shards)
    catalogs = LiveCatalogs()
    update_logs = update_log_store(settings.updates, settings.artifacts)

    def load(version: str | None) -> Retriever:
        if not encoders:  # loaded once, with the first index, before SERVING
            if not settings.text_queries:
                encoders.append(None)
            else:
                encoders.append(text_encoder or load_text_encoder(embedding))
        loaded = load_index_artifact(
            settings.artifacts,
            settings.nprobe,
            artifact_name,
            version,
            refine_factor=settings.refine_factor,
            max_rescored_rows=settings.max_rescored_rows,
        )
        if (loaded.shard, loaded.shard_count) != (settings.shard, settings.shards):
            # A shard answering for another shard's items would corrupt every merged answer.
            raise ArtifactError(
                f"{artifact_name}/{loaded.version} holds shard {loaded.shard} of {loaded.shard_count}, "
                f"but this server is configured for shard {settings.shard} of {settings.shards}"
            )
        # The version being replaced takes no more changes (UNAVAILABLE, retryable) while
        # this one replays its log and the tail the build did not fold.
        sealed = catalogs.seal_all()
        log_existed = update_logs.exists(artifact_name, loaded.version)
        try:
            live = open_live_catalog(
                loaded,
                artifact_name,
                read_params(settings.artifacts, artifact_name, loaded.version),
                update_logs,
                settings.updates,
                encoders[0],
            )
        except BaseException:
            for catalog in sealed:
                catalog.unseal()
            raise
        try:
            retriever = Retriever(
                loaded,
                settings.max_candidates,
                settings.max_exclusions,
                encoders[0],
                mix=settings.sources,
                exact_filter_below=settings.exact_filter_below,
                preference_items=settings.preference_items,
            )
            # One search before serving: the first caller should not pay for page faults.
            retriever.by_vector(np.ones(loaded.index.dimension, np.float32).tolist(), 1, [])
        except BaseException:
            if log_existed:
                live.close()
            else:  # never served: the next attempt carries the tail over afresh
                live.discard()
            for catalog in sealed:
                catalog.unseal()
            raise
        live.follow()
        catalogs.add(live)
        return retriever

    served = Reloadable(
        SERVICE_NAME,
        artifact_name,
        load,
        lambda retriever: retriever.loaded.version,
        lambda: current_version(settings.artifacts, artifact_name),
    )
    auth = settings.auth
    write_guard = (
        [BearerTokenInterceptor(auth.token, WRITE_METHODS, require_for_all=False)] if auth.token is not None else []
    )
    running = start_server(
        SERVICE_NAME,
        lambda server: retrieval_pb2_grpc.add_RetrievalServicer_to_server(
            RetrievalServicer(served, catalogs, settings.updates), server
        ),
        settings,
        served,
        interceptors=write_guard,
    )
    running.on_stop.append(catalogs.close)
    running.on_stop.append(update_logs.close)
    return running
