"""The ranking service's client of the retrieval service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt
from pydantic import SecretStr

from shared.errors import InvalidArgument, Unavailable
from shared.proto.vitrine.v1 import retrieval_pb2, retrieval_pb2_grpc
from shared.security import ClientTlsSettings, call_credentials_metadata, open_channel
from shared.tracing import client_span

SOURCE_POPULAR = "popular"
RETRIEVE_METHOD = "vitrine.v1.Retrieval/Retrieve"


@dataclass(frozen=True)
class RetrievedCandidates:
    item_ids: list[str]
    scores: npt.NDArray[np.float32]
    from_popular: bool
    index_version: str


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

    def _call(self, request: retrieval_pb2.RetrieveRequest, timeout_s: float) -> RetrievedCandidates:
        try:
            with client_span(RETRIEVE_METHOD) as metadata:
                response = self._stub.Retrieve(request, timeout=timeout_s, metadata=(*metadata, *self._auth_metadata))
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"retrieval rejected the query: {error.details()}") from error
            raise Unavailable(
                f"retrieval service at {self.target} failed: {code.name if code else 'UNKNOWN'} {error.details()}"
            ) from error
        return RetrievedCandidates(
            item_ids=[candidate.item_id for candidate in response.candidates],
            scores=np.fromiter((c.score for c in response.candidates), np.float32, len(response.candidates)),
            from_popular=bool(response.candidates) and response.candidates[0].source == SOURCE_POPULAR,
            index_version=response.index_version,
        )

    def by_history(
        self, item_ids: Sequence[str], weights: Sequence[float], n: int, exclude: Sequence[str], timeout_s: float
    ) -> RetrievedCandidates:
        request = retrieval_pb2.RetrieveRequest(
            history=retrieval_pb2.ItemHistory(item_ids=item_ids, weights=weights), n=n, exclude_item_ids=exclude
        )
        return self._call(request, timeout_s)

    def by_user(self, user_id: str, n: int, exclude: Sequence[str], timeout_s: float) -> RetrievedCandidates:
        return self._call(retrieval_pb2.RetrieveRequest(user_id=user_id, n=n, exclude_item_ids=exclude), timeout_s)
