"""The ranking service's client of the retrieval service: one index, or a sharded one.

:class:`RetrievalClient` talks to one target (a replica set of the whole index).
:class:`ShardedRetrievalClient` scatters every query over the shards of a sharded index
and gathers the answers in two steps, both in parallel over all shards:

1. ``QueryVector``: each shard returns its part of the query vector (the weighted sum of
   the history items it holds, or the user's vector if it holds the user); the parts add
   up to the query the unsharded index would build.
2. ``Retrieve`` with that vector: each shard answers with its best items, scored in the
   same vector space, and the answers are merged by score into the top ``n``.

A shard that fails or misses its deadline does not fail the request: the answer is the
merge of the other shards, flagged ``partial_reason``. Only when no shard answers does
the call raise :class:`Unavailable` (and the caller falls back to popular items).

Filters, the source mix and session items travel with every query (:class:`RetrievalOptions`).
Not shard-exact: the co-visitation and trending-category sources see only the session
items in step 2 (the history reaches the shards as a summed vector), and declared
preferences are answered by every shard from its own items, merged by score.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from opentelemetry import trace
from pydantic import SecretStr

from ranking_service.ragged import Ragged
from shared.errors import InvalidArgument, ServiceError, Unavailable
from shared.logs import event
from shared.proto.vitrine.v1 import catalog_pb2, retrieval_pb2, retrieval_pb2_grpc
from shared.security import ClientTlsSettings, call_credentials_metadata, open_channel
from shared.telemetry import SHARD_FAILURES
from shared.tracing import end_client_span, start_client_span

log = logging.getLogger(__name__)

SOURCE_POPULAR = "popular"
RETRIEVE_METHOD = "vitrine.v1.Retrieval/Retrieve"
QUERY_VECTOR_METHOD = "vitrine.v1.Retrieval/QueryVector"

# Why a merged answer lacks some shards (the `reason` label of vitrine_partial_responses_total).
PARTIAL_SHARD_FAILED = "shard_failed"
PARTIAL_VERSION_SKEW = "version_skew"
PARTIAL_SHARD_MISSING = "shard_missing"

Response = TypeVar("Response")


@dataclass(frozen=True)
class RetrievedCandidates:
    item_ids: list[str]
    scores: npt.NDArray[np.float32]
    # The text and collaborative parts of each score (zeros for popular items).
    content_scores: npt.NDArray[np.float32]
    collaborative_scores: npt.NDArray[np.float32]
    from_popular: bool
    index_version: str
    # Sharded index: why some shards are missing from the merge ("" when none is).
    partial_reason: str = ""
    # Per candidate, the attributes of an item upserted after the index build (None: a
    # catalogue item); empty when the answer did not say (or, for a columnar answer, when no
    # candidate is such an item).
    fresh_items: Sequence[catalog_pb2.ItemAttributes | None] = ()
    # Per candidate: every source that proposed it and that source's score, the history or
    # session items that led to it, and the stock retrieval reports (empty: not reported).
    # A columnar answer keeps the lists flat (:class:`Ragged`).
    sources: Sequence[tuple[str, ...]] = ()
    source_scores: Sequence[tuple[float, ...]] = ()
    anchor_ids: Sequence[tuple[str, ...]] = ()
    stock: npt.NDArray[np.int64] | None = None


@dataclass(frozen=True)
class RetrievalOptions:
    """What a query carries besides itself (see RetrieveRequest)."""

    item_filter: catalog_pb2.ItemFilter | None = None
    # (source, share); empty: the retrieval service's configured mix.
    mix: Sequence[tuple[str, float]] = ()
    session_item_ids: Sequence[str] = field(default_factory=list)
    # False: the answer leaves out per-candidate anchors (only explanations read them).
    anchors: bool = True

    def apply(self, request: retrieval_pb2.RetrieveRequest) -> retrieval_pb2.RetrieveRequest:
        request.without_anchors = not self.anchors
        if self.item_filter is not None:
            request.filter.CopyFrom(self.item_filter)
        request.mix.extend(retrieval_pb2.SourceQuota(source=source, share=share) for source, share in self.mix)
        request.session_item_ids.extend(self.session_item_ids)
        return request


NO_OPTIONS = RetrievalOptions()


class CandidateSource(Protocol):
    """What the candidate stage needs from retrieval, whole or sharded."""

    target: str

    def by_history(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates: ...

    def by_user(
        self, user_id: str, n: int, exclude: Sequence[str], timeout_s: float, options: RetrievalOptions = NO_OPTIONS
    ) -> RetrievedCandidates: ...

    def by_preferences(
        self,
        preferences: catalog_pb2.DeclaredPreferences,
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates: ...

    def wait_ready(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


def call_failed(error: grpc.RpcError, target: str) -> ServiceError:
    """What a failed retrieval call means to the caller: :class:`InvalidArgument` when the
    query itself was rejected, :class:`Unavailable` otherwise."""
    code = error.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"retrieval rejected the query: {error.details()}")
    return Unavailable(f"retrieval service at {target} failed: {code.name if code else 'UNKNOWN'} {error.details()}")


class PendingCall(Generic[Response]):
    """One call in flight (a gRPC future) with its client span."""

    def __init__(self, future: grpc.CallFuture[Response], span: trace.Span, target: str) -> None:
        self._future = future
        self._span = span
        self._target = target

    def result(self) -> Response:
        """The response; :class:`InvalidArgument` or :class:`Unavailable` when the call failed."""
        try:
            response = self._future.result()
        except grpc.RpcError as error:
            end_client_span(self._span, error)
            raise call_failed(error, self._target) from error
        except grpc.FutureCancelledError as error:
            end_client_span(self._span, error)
            raise Unavailable(f"call to retrieval service at {self._target} was cancelled") from error
        end_client_span(self._span)
        return response


def _candidates(
    candidates: Sequence[retrieval_pb2.Candidate], index_version: str, partial_reason: str = ""
) -> RetrievedCandidates:
    return RetrievedCandidates(
        item_ids=[candidate.item_id for candidate in candidates],
        scores=np.fromiter((c.score for c in candidates), np.float32, len(candidates)),
        content_scores=np.fromiter((c.content_score for c in candidates), np.float32, len(candidates)),
        collaborative_scores=np.fromiter((c.collaborative_score for c in candidates), np.float32, len(candidates)),
        from_popular=bool(candidates) and candidates[0].source == SOURCE_POPULAR,
        index_version=index_version,
        partial_reason=partial_reason,
        fresh_items=tuple(c.fresh_item if c.HasField("fresh_item") else None for c in candidates),
        sources=tuple(tuple(c.sources) or (c.source,) for c in candidates),
        source_scores=tuple(tuple(c.source_scores) or (c.score,) for c in candidates),
        anchor_ids=tuple(tuple(c.anchor_item_ids) for c in candidates),
        stock=np.fromiter((c.stock for c in candidates), np.int64, len(candidates)),
    )


def _from_columns(
    columns: retrieval_pb2.CandidateColumns, index_version: str, partial_reason: str = ""
) -> RetrievedCandidates:
    """A columnar answer (RetrieveRequest.columnar) as arrays and flat lists: the same
    candidates :func:`_candidates` reads from the per-candidate form, without a Python
    object per candidate."""
    n = len(columns.item_ids)
    names = list(columns.source_names)
    primary = [names[code] for code in columns.primary_sources]
    scores = np.asarray(columns.scores, dtype=np.float32)
    source_counts = np.asarray(columns.source_counts, dtype=np.int64)
    sources = [names[code] for code in columns.sources]
    source_scores = list(columns.source_scores)
    if len(primary) != n or len(source_counts) != n or len(scores) != n:
        raise Unavailable(f"retrieval sent a columnar answer with columns of different lengths ({n} item ids)")
    if not np.all(source_counts > 0):
        # A candidate that lists no source stands for its primary source and score (as in
        # the per-candidate form); rare, so per candidate.
        per_candidate = list(Ragged.from_counts(sources, source_counts))
        per_score = list(Ragged.from_counts(source_scores, source_counts))
        for position in np.flatnonzero(source_counts == 0).tolist():
            per_candidate[position] = (primary[position],)
            per_score[position] = (float(scores[position]),)
        source_counts = np.asarray([len(tags) for tags in per_candidate], dtype=np.int64)
        sources = [tag for tags in per_candidate for tag in tags]
        source_scores = [value for values in per_score for value in values]
    fresh: tuple[catalog_pb2.ItemAttributes | None, ...] = ()
    if columns.fresh_positions:
        slots: list[catalog_pb2.ItemAttributes | None] = [None] * n
        for position, attributes in zip(columns.fresh_positions, columns.fresh_items, strict=True):
            slots[position] = attributes
        fresh = tuple(slots)
    return RetrievedCandidates(
        item_ids=list(columns.item_ids),
        scores=scores,
        content_scores=np.asarray(columns.content_scores, dtype=np.float32),
        collaborative_scores=np.asarray(columns.collaborative_scores, dtype=np.float32),
        from_popular=n > 0 and primary[0] == SOURCE_POPULAR,
        index_version=index_version,
        partial_reason=partial_reason,
        fresh_items=fresh,
        sources=Ragged.from_counts(sources, source_counts),
        source_scores=Ragged.from_counts(source_scores, source_counts),
        anchor_ids=Ragged.from_codes(list(columns.anchor_item_ids), columns.anchors, columns.anchor_counts),
        stock=np.asarray(columns.stock, dtype=np.int64),
    )


def retrieved(response: retrieval_pb2.RetrieveResponse, partial_reason: str = "") -> RetrievedCandidates:
    """The candidates of an answer, columnar or per candidate (a server that predates
    RetrieveRequest.columnar answers per candidate)."""
    if response.HasField("columns"):
        return _from_columns(response.columns, response.index_version, partial_reason)
    return _candidates(response.candidates, response.index_version, partial_reason)


class RetrievalClient:
    def __init__(
        self,
        target: str,
        max_message_bytes: int = 4 * 1024 * 1024,
        tls: ClientTlsSettings | None = None,
        token: SecretStr | None = None,
        lb_policy: str = "round_robin",
    ) -> None:
        self._auth_metadata = call_credentials_metadata(token) if token is not None else ()
        self._channel = open_channel(
            target,
            tls or ClientTlsSettings(),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # A restarted retrieval replica is picked up within a second, not after
                # gRPC's default backoff of up to two minutes.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.lb_policy_name", lb_policy),
            ],
            setting="ranking.retrieval_tls",
        )
        self._stub = retrieval_pb2_grpc.RetrievalStub(self._channel)
        self.target = target

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as error:
            raise Unavailable(f"retrieval service at {self.target} not reachable within {timeout_s}s") from error

    def start_retrieve(
        self, request: retrieval_pb2.RetrieveRequest, timeout_s: float
    ) -> PendingCall[retrieval_pb2.RetrieveResponse]:
        span, metadata = start_client_span(RETRIEVE_METHOD)
        future = self._stub.Retrieve.future(request, timeout=timeout_s, metadata=(*metadata, *self._auth_metadata))
        return PendingCall(future, span, self.target)

    def start_query_vector(
        self, request: retrieval_pb2.QueryVectorRequest, timeout_s: float
    ) -> PendingCall[retrieval_pb2.QueryVectorResponse]:
        span, metadata = start_client_span(QUERY_VECTOR_METHOD)
        future = self._stub.QueryVector.future(request, timeout=timeout_s, metadata=(*metadata, *self._auth_metadata))
        return PendingCall(future, span, self.target)

    def _call(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float) -> RetrievedCandidates:
        # Columns: one packed field per attribute instead of one message per candidate (the
        # per-candidate form cost ~1.5 ms to build and ~2 ms to read for 500 candidates).
        request.columnar = True
        # A blocking call, not a future: with no call in flight, every future() starts a new
        # thread to poll the channel (grpc's sync client), ~0.3 ms per request.
        span, metadata = start_client_span(RETRIEVE_METHOD)
        try:
            response = self._stub.Retrieve(request, timeout=timeout_s, metadata=(*metadata, *self._auth_metadata))
        except grpc.RpcError as error:
            end_client_span(span, error)
            raise call_failed(error, self.target) from error
        end_client_span(span)
        return retrieved(response)

    def by_history(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates:
        request = retrieval_pb2.RetrieveRequest(
            history=retrieval_pb2.ItemHistory(item_ids=item_ids, weights=weights), n=n, exclude_item_ids=exclude
        )
        return self._call(options.apply(request), timeout_s)

    def by_user(
        self, user_id: str, n: int, exclude: Sequence[str], timeout_s: float, options: RetrievalOptions = NO_OPTIONS
    ) -> RetrievedCandidates:
        request = retrieval_pb2.RetrieveRequest(user_id=user_id, n=n, exclude_item_ids=exclude)
        return self._call(options.apply(request), timeout_s)

    def by_preferences(
        self,
        preferences: catalog_pb2.DeclaredPreferences,
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates:
        request = retrieval_pb2.RetrieveRequest(preferences=preferences, n=n, exclude_item_ids=exclude)
        return self._call(options.apply(request), timeout_s)


def newest_majority_version(versions: Iterable[str]) -> str:
    """The version most shards serve; on a tie the newest (versions sort by build time)."""
    counts: dict[str, int] = {}
    for version in versions:
        counts[version] = counts.get(version, 0) + 1
    if not counts:
        raise ValueError("no versions to choose from")
    return max(counts, key=lambda version: (counts[version], version))


def merge_answers(answers: Iterable[retrieval_pb2.RetrieveResponse], n: int) -> list[retrieval_pb2.Candidate]:
    """The best ``n`` candidates of several shards' answers, best first.

    Shards hold disjoint items, so an id seen twice (two targets serving one shard) keeps
    its best score; ties break by item id so the merge is deterministic.
    """
    best: dict[str, retrieval_pb2.Candidate] = {}
    for answer in answers:
        for candidate in answer.candidates:
            seen = best.get(candidate.item_id)
            if seen is None or candidate.score > seen.score:
                best[candidate.item_id] = candidate
    return sorted(best.values(), key=lambda candidate: (-candidate.score, candidate.item_id))[:n]


@dataclass(frozen=True)
class _Scattered(Generic[Response]):
    answers: dict[int, Response]  # by position in the target list
    failures: dict[int, str]


class ShardedRetrievalClient:
    """Scatter-gather over the shards of a sharded item index (see the module docstring)."""

    def __init__(
        self,
        targets: Sequence[str],
        query_share: float,
        service: str,
        max_message_bytes: int = 4 * 1024 * 1024,
        tls: ClientTlsSettings | None = None,
        token: SecretStr | None = None,
        lb_policy: str = "round_robin",
    ) -> None:
        if not targets:
            raise ValueError("a sharded retrieval client needs at least one shard target")
        self._shards = [RetrievalClient(target, max_message_bytes, tls, token, lb_policy) for target in targets]
        self._query_share = query_share
        self._service = service
        self.target = ",".join(targets)

    @property
    def targets(self) -> list[str]:
        return [shard.target for shard in self._shards]

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for shard in self._shards:
            shard.wait_ready(max(deadline - time.monotonic(), 0.0))

    def by_history(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates:
        history = retrieval_pb2.ItemHistory(item_ids=item_ids, weights=weights)
        return self._gather(
            retrieval_pb2.QueryVectorRequest(history=history),
            options.apply(retrieval_pb2.RetrieveRequest(history=history, n=n, exclude_item_ids=exclude)),
            timeout_s,
        )

    def by_user(
        self, user_id: str, n: int, exclude: Sequence[str], timeout_s: float, options: RetrievalOptions = NO_OPTIONS
    ) -> RetrievedCandidates:
        return self._gather(
            retrieval_pb2.QueryVectorRequest(user_id=user_id),
            options.apply(retrieval_pb2.RetrieveRequest(user_id=user_id, n=n, exclude_item_ids=exclude)),
            timeout_s,
        )

    def by_preferences(
        self,
        preferences: catalog_pb2.DeclaredPreferences,
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates:
        """Every shard answers from its own items (not shard-exact: each builds its own query)."""
        request = options.apply(retrieval_pb2.RetrieveRequest(preferences=preferences, n=n, exclude_item_ids=exclude))
        searched = self._scatter(
            lambda shard, timeout: shard.start_retrieve(request, timeout), range(len(self._shards)), timeout_s, "search"
        )
        if not searched.answers:
            raise Unavailable(f"no retrieval shard answered: {'; '.join(searched.failures.values())}")
        version = newest_majority_version(answer.index_version for answer in searched.answers.values())
        answers = [answer for answer in searched.answers.values() if answer.index_version == version]
        reason = PARTIAL_SHARD_FAILED if searched.failures else ""
        return _candidates(merge_answers(answers, n), version, reason)

    def _scatter(
        self,
        start: Callable[[RetrievalClient, float], PendingCall[Response]],
        positions: Iterable[int],
        timeout_s: float,
        step: str,
    ) -> _Scattered[Response]:
        """Start one call per shard, then collect them all; every call has the same deadline."""
        pending = {position: start(self._shards[position], timeout_s) for position in positions}
        answers: dict[int, Response] = {}
        failures: dict[int, str] = {}
        rejected: InvalidArgument | None = None
        for position, call in pending.items():
            try:
                answers[position] = call.result()
            except InvalidArgument as error:
                # The query itself is wrong, on every shard alike: the caller must hear it.
                rejected = error
            except ServiceError as error:
                failures[position] = str(error)
                SHARD_FAILURES.labels(self._service, str(position), step).inc()
        if rejected is not None:
            raise rejected
        return _Scattered(answers, failures)

    def _gather(
        self,
        part_request: retrieval_pb2.QueryVectorRequest,
        direct_request: retrieval_pb2.RetrieveRequest,
        timeout_s: float,
    ) -> RetrievedCandidates:
        deadline = time.monotonic() + timeout_s
        parts = self._scatter(
            lambda shard, timeout: shard.start_query_vector(part_request, timeout),
            range(len(self._shards)),
            timeout_s * self._query_share,
            "query",
        )
        if not parts.answers:
            raise Unavailable(f"no retrieval shard answered: {'; '.join(parts.failures.values())}")
        # Parts of different index versions live in different vector spaces (a rollout in
        # progress): keep one version, one answer per shard index.
        version = newest_majority_version(part.index_version for part in parts.answers.values())
        by_shard: dict[int, int] = {}
        for position, part in parts.answers.items():
            if part.index_version == version:
                by_shard.setdefault(part.shard, position)
        kept = {position: parts.answers[position] for position in by_shard.values()}

        query = np.zeros(0, dtype=np.float64)
        for part in kept.values():
            if part.known and part.partial.values:
                values = np.asarray(part.partial.values, dtype=np.float64)
                query = values if not len(query) else query + values
        if len(query) and np.any(query):
            request = retrieval_pb2.RetrieveRequest(
                vector=retrieval_pb2.FloatVector(values=query.tolist()),
                n=direct_request.n,
                exclude_item_ids=direct_request.exclude_item_ids,
                mix=direct_request.mix,
                session_item_ids=direct_request.session_item_ids,
                without_anchors=direct_request.without_anchors,
            )
            if direct_request.HasField("filter"):
                request.filter.CopyFrom(direct_request.filter)
        else:
            # No shard holds any of the query: each answers with its popular items, which
            # are scored by their rank in the whole catalogue and so merge like vectors do.
            request = direct_request

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable("no time left for the retrieval search step after the query-vector step")
        searched = self._scatter(
            lambda shard, timeout: shard.start_retrieve(request, timeout), kept.keys(), remaining, "search"
        )
        # A shard may have swapped versions between the two steps.
        answers = [answer for answer in searched.answers.values() if answer.index_version == version]
        if not answers:
            raise Unavailable(f"no retrieval shard answered the search: {'; '.join(searched.failures.values())}")
        versions = [part.index_version for part in parts.answers.values()]
        versions += [answer.index_version for answer in searched.answers.values()]
        skewed = any(other != version for other in versions)

        shard_count = answers[0].shard_count
        missing = sorted(set(range(shard_count)) - {answer.shard for answer in answers})
        reason = ""
        if missing:
            failures = {**parts.failures, **searched.failures}
            reason = PARTIAL_SHARD_FAILED if failures else PARTIAL_VERSION_SKEW if skewed else PARTIAL_SHARD_MISSING
            event(
                log,
                "retrieval answer merged from some shards only",
                level=logging.WARNING,
                reason=reason,
                missing_shards=missing,
                shard_count=shard_count,
                index_version=version,
                failures={self._shards[position].target: error for position, error in failures.items()},
            )
        return _candidates(merge_answers(answers, direct_request.n), version, reason)
