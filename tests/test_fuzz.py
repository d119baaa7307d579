"""Property-based fuzzing of every public RPC against the real servers on loopback.

Every request Hypothesis can build from the protos (huge, negative and zero ints, any
int64 timestamp, open enum values, empty / oversized / unicode / control-character
strings, duplicated and unknown ids mixed with real ones, NaN / inf / huge / denormal
floats, vectors and weights of the wrong length) must either succeed with a
well-formed answer or fail with a status that blames the caller. INTERNAL, UNKNOWN,
UNAVAILABLE or DEADLINE_EXCEEDED means the service broke (a bug to report, not to
paper over here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.config import default_sources
from shared.data import Dataset
from shared.proto.vitrine.v1 import admin_pb2, admin_pb2_grpc, ranking_pb2, retrieval_pb2
from tests.conftest import Servers, users_by_activity

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The servers under test (tests/conftest.py): max_k=50, max_candidates=500, 10 000 exclusions.
MAX_K = 50
MAX_CANDIDATES = 500
MAX_EXCLUSIONS = 10_000
# gRPC's 4 MiB message limit, minus headroom for framing.
MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
TIMEOUT_S = 10
# Below this many excluded catalogue items, a successful answer must not be empty.
FEW_EXCLUSIONS = 100

# The caller's fault, or the server protecting itself: acceptable answers to junk.
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

Request = TypeVar(
    "Request",
    ranking_pb2.RecommendRequest,
    retrieval_pb2.RetrieveRequest,
    retrieval_pb2.SimilarItemsRequest,
    retrieval_pb2.QueryVectorRequest,
    admin_pb2.ReloadArtifactsRequest,
)
Response = TypeVar(
    "Response",
    ranking_pb2.RecommendResponse,
    retrieval_pb2.RetrieveResponse,
    retrieval_pb2.QueryVectorResponse,
    admin_pb2.ReloadArtifactsResponse,
)


# -- scalar strategies ------------------------------------------------------------------


T = TypeVar("T")


def mostly(valid: st.SearchStrategy[T], other: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``valid`` three times in four: each field is usually valid, so requests get past validation."""
    return st.one_of(valid, valid, valid, other)


def counts(maximum: int) -> st.SearchStrategy[int]:
    """k or n: usually 1..maximum, else any int32, biased towards the boundaries."""
    edges = [0, 1, -1, maximum, maximum + 1, INT32_MIN, INT32_MAX, INT32_MIN + 1, INT32_MAX - 1]
    return mostly(
        st.one_of(st.integers(1, maximum), st.sampled_from([1, maximum])),
        st.one_of(st.sampled_from(edges), st.integers(INT32_MIN, INT32_MAX)),
    )


def timestamps(dataset: Dataset) -> st.SearchStrategy[int]:
    """Usually plausible unix seconds around the dataset's events; else any int64."""
    first, last = int(dataset.events.timestamp.min()), int(dataset.events.timestamp.max())
    year = 365 * 86_400
    edges = [-1, INT64_MIN, INT64_MAX, 32_503_680_001, 2**31, 2**32, 2**62, 1_780_000_000_000]
    return mostly(
        st.one_of(
            st.integers(first - year, last + year),
            st.sampled_from([0, 1, first, last, last + 60, 32_503_680_000]),
            st.integers(0, 32_503_680_000),
        ),
        st.one_of(st.sampled_from(edges), st.integers(INT64_MIN, INT64_MAX)),
    )


def devices() -> st.SearchStrategy[int]:
    """Known Device values and any other int32 (proto3 enums are open)."""
    return st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1]), st.integers(INT32_MIN, INT32_MAX))


CONTROL = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"])


def junk_strings() -> st.SearchStrategy[str]:
    """Empty, whitespace, control characters, any unicode, long (<100 KB encoded)."""
    return st.one_of(
        st.just(""),
        st.sampled_from([" ", "\t\n", "\x00", "\u200b", "\ufeff", "\U0010ffff", "../../etc/passwd", "%s%n{}"]),
        st.text(alphabet=CONTROL, max_size=20),
        st.text(max_size=40),
        st.builds(lambda char, size: char * size, st.characters(codec="ascii"), st.integers(200, 90_000)),
        st.builds(lambda char, size: char * size, st.characters(min_codepoint=0x80), st.integers(200, 20_000)),
    )


def ids_from(real: list[str]) -> st.SearchStrategy[str]:
    """Real ids (often), near misses of real ids, and junk."""
    real_ids = st.sampled_from(real)
    near_misses = st.builds(
        lambda item_id, mutate: mutate(item_id),
        real_ids,
        st.sampled_from(
            [
                str.upper,
                str.lower,
                lambda s: s + " ",
                lambda s: " " + s,
                lambda s: s + "\x00",
                lambda s: s[:-1],
                lambda s: s + s,
            ]
        ),
    )
    return st.one_of(real_ids, real_ids, real_ids, near_misses, junk_strings())


def id_lists(real: list[str], max_size: int = 25) -> st.SearchStrategy[list[str]]:
    """Lists with duplicates, mixed real / unknown ids, and lists around the exclusion limit."""
    ids = ids_from(real)
    with_duplicates = st.builds(
        lambda items, repeat: (items * repeat)[: max_size * 2], st.lists(ids, min_size=1, max_size=5), st.integers(2, 6)
    )
    near_limit = st.builds(
        lambda item_id, size: [item_id] * size, st.sampled_from([*real[:3], "x"]), st.integers(9_990, 10_010)
    )
    all_real = st.builds(lambda size: real[:size], st.sampled_from([len(real), len(real) - 1, 300, 500]))
    return mostly(
        st.one_of(st.lists(ids, max_size=max_size), with_duplicates, st.just([])), st.one_of(near_limit, all_real)
    )


FLOAT_EDGES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    3.4028235e38,
    -3.4028235e38,
    1e38,
    1e30,
    1e20,
    1e-38,
    1.4e-45,
    -1.4e-45,
    1e300,
    1e-300,
]


# Powers of ten across (and beyond) the float32 range, negative ones too.
MAGNITUDES = st.builds(
    lambda sign, exponent: sign * 10.0**exponent, st.sampled_from([1.0, -1.0]), st.integers(-46, 39)
) | st.sampled_from([3.4028235e38, 1.4e-45, 1.1754944e-38])


def any_floats() -> st.SearchStrategy[float]:
    """Every float32 (NaN, inf, denormals) plus doubles that do not fit a float32."""
    return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32), st.floats(), st.floats(-2.0, 2.0, width=32))


def vectors(dimension: int) -> st.SearchStrategy[list[float]]:
    """Right dimension (plain, or salted with special values) and wrong dimensions."""
    plain = st.floats(-1.0, 1.0, width=32)

    @st.composite
    def salted(draw: st.DrawFn) -> list[float]:
        values = draw(arrays(np.float32, dimension, elements=plain, fill=plain)).tolist()
        for _ in range(draw(st.integers(0, 4))):
            values[draw(st.integers(0, dimension - 1))] = draw(any_floats())
        return [float(value) for value in values]

    @st.composite
    def scaled(draw: st.DrawFn) -> list[float]:
        """A plain vector times a tiny or huge magnitude (overflow to inf and underflow to 0 included)."""
        values = draw(arrays(np.float32, dimension, elements=plain, fill=plain)).astype(np.float64)
        with np.errstate(over="ignore", under="ignore"):
            return (values * draw(MAGNITUDES)).astype(np.float32).tolist()  # type: ignore[no-any-return]

    def filled(value: float) -> list[float]:
        return [value] * dimension

    wrong_size = st.integers(0, 3 * dimension).filter(lambda size: size != dimension)
    return st.one_of(
        salted(),
        salted(),
        scaled(),
        scaled(),
        st.builds(filled, st.one_of(any_floats(), MAGNITUDES)),
        st.lists(any_floats(), min_size=dimension, max_size=dimension),
        wrong_size.flatmap(lambda size: st.lists(plain, min_size=size, max_size=size)),
        st.sampled_from([dimension - 1, dimension + 1, 0, 1]).flatmap(
            lambda size: st.lists(any_floats(), min_size=size, max_size=size)
        ),
    )


# -- request strategies --------------------------------------------------------------------


def user_ids(users: list[str], items: list[str]) -> st.SearchStrategy[str]:
    """Known users, unknown but plausible ids, and junk (item ids, control characters, too long)."""
    plausible = st.one_of(st.sampled_from(users), st.sampled_from(users), st.text(min_size=1, max_size=60))
    return mostly(plausible, st.one_of(junk_strings(), ids_from(items)))


@st.composite
def recommend_requests(draw: st.DrawFn, dataset: Dataset, users: list[str], items: list[str]) -> Any:
    request = ranking_pb2.RecommendRequest(
        user_id=draw(user_ids(users, items)),
        k=draw(counts(MAX_K)),
        exclude_item_ids=draw(id_lists(items)),
    )
    if draw(st.booleans()):
        request.context.CopyFrom(
            ranking_pb2.RequestContext(
                timestamp=draw(timestamps(dataset)),
                device=draw(devices()),  # type: ignore[arg-type]
                session_item_ids=draw(
                    mostly(
                        st.lists(ids_from(items), max_size=50),
                        st.one_of(
                            st.lists(ids_from(items), max_size=55), st.builds(lambda i: [i] * 51, ids_from(items))
                        ),
                    )
                ),
            )
        )
    return request


@st.composite
def histories(draw: st.DrawFn, items: list[str]) -> tuple[list[str], list[float]]:
    """Item lists of every kind; weights absent, of the wrong length, of any value, or all of one odd scale."""
    long_real_history = st.lists(st.sampled_from(items), min_size=10, max_size=60)
    one_item_again_and_again = st.builds(
        lambda item_id, size: [item_id] * size, st.sampled_from(items), st.integers(2, 60)
    )
    item_ids = draw(st.one_of(id_lists(items, max_size=40), long_real_history, one_item_again_and_again))
    weight_values = st.one_of(any_floats(), st.floats(0.0, 10.0, width=32), st.floats(0.0, 10.0, width=32))
    extreme = st.sampled_from([3.4028235e38, 1e38, 1e20, 1e-24, 1.4e-45])
    mode = draw(st.sampled_from(["none", "any", "scale", "scale", "wrong_length"]))
    count = len(item_ids)
    if mode == "none":
        return item_ids, []
    if mode == "wrong_length":
        count = draw(st.integers(0, count + 3).filter(lambda size: size != len(item_ids)))
    if mode == "scale" or count > 100:  # Hypothesis cannot draw thousands of elements one by one
        weights = [draw(st.one_of(extreme, MAGNITUDES.map(abs), weight_values))] * count
    else:
        weights = draw(st.lists(weight_values, min_size=count, max_size=count))
    return item_ids, weights


@st.composite
def retrieve_requests(draw: st.DrawFn, dimension: int, users: list[str], items: list[str]) -> Any:
    request = retrieval_pb2.RetrieveRequest(n=draw(counts(MAX_CANDIDATES)), exclude_item_ids=draw(id_lists(items)))
    mode = draw(st.sampled_from(["user_id", "history", "vector", "text", "none"]))
    if mode == "user_id":
        request.user_id = draw(user_ids(users, items))
    elif mode == "history":
        item_ids, weights = draw(histories(items))
        request.history.CopyFrom(retrieval_pb2.ItemHistory(item_ids=item_ids, weights=weights))
    elif mode == "vector":
        request.vector.values.extend(draw(vectors(dimension)))
    elif mode == "text":
        request.text = draw(st.one_of(junk_strings(), st.text(min_size=1990, max_size=2010), st.just("red shoes")))
    return request


@st.composite
def similar_items_requests(draw: st.DrawFn, items: list[str]) -> Any:
    return retrieval_pb2.SimilarItemsRequest(
        item_id=draw(mostly(st.sampled_from(items), ids_from(items))),
        n=draw(counts(MAX_CANDIDATES)),
        exclude_item_ids=draw(id_lists(items)),
    )


# -- calling and checking -------------------------------------------------------------------


def _describe(request: Any) -> str:
    text = repr(request)
    return text if len(text) < 2000 else text[:2000] + f"... ({request.ByteSize()} bytes)"


def _call(method: Callable[..., Response], request: Request) -> Response | None:
    """The response, or None for an acceptable error; any other status fails the test."""
    assume(request.ByteSize() < MAX_REQUEST_BYTES)
    try:
        return method(request, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()
        details = error.details()
        assert code in CLIENT_ERRORS, f"{code} ({details}) for request:\n{_describe(request)}"
        return None


DEFAULT_TAGS = {"ann" if entry.source == "fused" else entry.source for entry in default_sources()}


def _check_candidates(
    response: retrieval_pb2.RetrieveResponse, n: int, excluded: set[str], catalogue: set[str]
) -> list[str]:
    ids = [candidate.item_id for candidate in response.candidates]
    assert 1 <= n <= MAX_CANDIDATES, f"n={n} was accepted"
    assert len(ids) <= n, f"{len(ids)} candidates for n={n}"
    assert len(set(ids)) == len(ids), f"duplicate candidates: {ids}"
    assert not set(ids) & excluded, f"excluded ids returned: {set(ids) & excluded}"
    assert set(ids) <= catalogue, f"unknown ids returned: {set(ids) - catalogue}"
    scores = [candidate.score for candidate in response.candidates]
    assert all(math.isfinite(score) for score in scores), f"non-finite scores: {scores[:10]}"
    # The default mix's sources (the fused one is tagged "ann"), or popular items.
    assert {candidate.source for candidate in response.candidates} <= DEFAULT_TAGS | {"popular"}
    assert response.dimension > 0
    assert response.index_version
    if len(excluded & catalogue) < FEW_EXCLUSIONS:
        # Thousands of items are left: an empty answer is a query that silently matched nothing.
        assert ids, "no candidates although almost nothing was excluded"
    return ids


def _dimension(servers: Servers) -> int:
    return servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id="x", n=1), timeout=TIMEOUT_S).dimension


def _assert_alive(servers: Servers, dataset: Dataset) -> None:
    """Both servers still serve a normal request (and report SERVING)."""
    user = users_by_activity(dataset)[0]
    for channel, service in zip(servers.channels, ("vitrine.v1.Retrieval", "vitrine.v1.Ranking"), strict=True):
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S).status
        assert status == health_pb2.HealthCheckResponse.SERVING, f"{service} is {status}"
    retrieved = servers.retrieval.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user, n=10), timeout=TIMEOUT_S)
    assert len(retrieved.candidates) == 10
    similar = servers.retrieval.SimilarItems(
        retrieval_pb2.SimilarItemsRequest(item_id=str(dataset.catalog.item_ids[0]), n=10), timeout=TIMEOUT_S
    )
    assert len(similar.candidates) == 10
    recommended = servers.ranking.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10), timeout=TIMEOUT_S)
    assert len(recommended.items) == 10
    assert not recommended.degraded


def _pools(dataset: Dataset) -> tuple[list[str], list[str], set[str]]:
    items = [str(item_id) for item_id in dataset.catalog.item_ids.tolist()]
    users = users_by_activity(dataset)[:200] + [str(user_id) for user_id in dataset.users.user_ids[-20:].tolist()]
    return users, items, set(items)


# -- the properties -------------------------------------------------------------------------------


def test_recommend_never_fails_on_the_server_side(servers: Servers, dataset: Dataset) -> None:
    users, items, catalogue = _pools(dataset)

    @settings(FUZZ, max_examples=150)
    @given(recommend_requests(dataset, users, items))
    def recommend(request: ranking_pb2.RecommendRequest) -> None:
        response = _call(servers.ranking.Recommend, request)
        if response is None:
            return
        ids = [item.item_id for item in response.items]
        assert 1 <= request.k <= MAX_K, f"k={request.k} was accepted"
        assert request.user_id, "an empty user_id was accepted"
        assert len(ids) <= request.k, f"{len(ids)} items for k={request.k}"
        assert len(set(ids)) == len(ids), f"duplicate items: {ids}"
        assert not set(ids) & set(request.exclude_item_ids), "excluded items recommended"
        assert set(ids) <= catalogue, f"unknown ids recommended: {set(ids) - catalogue}"
        assert all(math.isfinite(item.score) for item in response.items), "non-finite scores"
        assert response.request_id
        assert response.model_version

    recommend()
    _assert_alive(servers, dataset)


def test_retrieve_never_fails_on_the_server_side(servers: Servers, dataset: Dataset) -> None:
    users, items, catalogue = _pools(dataset)
    dimension = _dimension(servers)

    @FUZZ
    @given(retrieve_requests(dimension, users, items))
    def retrieve(request: retrieval_pb2.RetrieveRequest) -> None:
        response = _call(servers.retrieval.Retrieve, request)
        if response is None:
            return
        assert request.WhichOneof("query") is not None, "a request without a query was accepted"
        _check_candidates(response, request.n, set(request.exclude_item_ids), catalogue)
        assert response.dimension == dimension

    retrieve()
    _assert_alive(servers, dataset)


def test_retrieve_by_vector_never_fails_on_the_server_side(servers: Servers, dataset: Dataset) -> None:
    """The vector mode on its own: the float edge cases need more examples than a fifth of the run."""
    _, items, catalogue = _pools(dataset)
    dimension = _dimension(servers)

    @FUZZ
    @given(vectors(dimension), st.sampled_from([1, 10, MAX_CANDIDATES]), id_lists(items, max_size=5))
    def retrieve(values: list[float], n: int, exclude: list[str]) -> None:
        request = retrieval_pb2.RetrieveRequest(
            vector=retrieval_pb2.FloatVector(values=values), n=n, exclude_item_ids=exclude
        )
        response = _call(servers.retrieval.Retrieve, request)
        if response is not None:
            _check_candidates(response, n, set(exclude), catalogue)

    retrieve()
    _assert_alive(servers, dataset)


def test_retrieve_by_history_never_fails_on_the_server_side(servers: Servers, dataset: Dataset) -> None:
    """The history mode on its own: weights of every length and value."""
    _, items, catalogue = _pools(dataset)

    @settings(FUZZ, max_examples=200)
    @given(histories(items), st.sampled_from([1, 10, MAX_CANDIDATES]))
    def retrieve(history: tuple[list[str], list[float]], n: int) -> None:
        request = retrieval_pb2.RetrieveRequest(
            history=retrieval_pb2.ItemHistory(item_ids=history[0], weights=history[1]), n=n
        )
        response = _call(servers.retrieval.Retrieve, request)
        if response is not None:
            _check_candidates(response, n, set(), catalogue)

    retrieve()
    _assert_alive(servers, dataset)


def test_history_weights_are_relative(servers: Servers, dataset: Dataset) -> None:
    """Scaling every weight by the same factor leaves the query direction unchanged.

    The query is the normalised weighted mean of the items' vectors, so [w, w, ...] must
    answer like no weights at all for any positive normal float32 w: tiny ones (decayed
    recency weights) and huge ones included.
    """
    _, items, _ = _pools(dataset)
    n = 20
    histories = st.one_of(
        st.lists(st.sampled_from(items), min_size=1, max_size=40),
        st.builds(lambda item_id, size: [item_id] * size, st.sampled_from(items), st.integers(1, 40)),
    )
    scales = st.one_of(
        st.sampled_from([3.4028235e38, 1e38, 1e20, 1e19, 1e-20, 1e-24, 1.1754944e-38]),
        MAGNITUDES.map(abs).filter(lambda w: 1.2e-38 <= w <= 3.4e38),
    )

    @FUZZ
    @given(histories, scales)
    def scale_free(item_ids: list[str], weight: float) -> None:
        plain = servers.retrieval.Retrieve(
            retrieval_pb2.RetrieveRequest(history=retrieval_pb2.ItemHistory(item_ids=item_ids), n=n), timeout=TIMEOUT_S
        )
        history = retrieval_pb2.ItemHistory(item_ids=item_ids, weights=[weight] * len(item_ids))
        scaled = _call(servers.retrieval.Retrieve, retrieval_pb2.RetrieveRequest(history=history, n=n))
        assert scaled is not None, "a valid weighted history was rejected"
        assert scaled.candidates, f"no candidates at all with w={weight}"
        sources = {candidate.source for candidate in scaled.candidates}
        assert sources == {candidate.source for candidate in plain.candidates}, f"source {sources} with w={weight}"
        same = {c.item_id for c in plain.candidates} & {c.item_id for c in scaled.candidates}
        assert len(same) >= n // 2, f"only {len(same)} of {n} candidates in common with w={weight}"

    scale_free()
    _assert_alive(servers, dataset)


def test_similar_items_never_fails_on_the_server_side(servers: Servers, dataset: Dataset) -> None:
    _, items, catalogue = _pools(dataset)

    @FUZZ
    @given(similar_items_requests(items))
    def similar(request: retrieval_pb2.SimilarItemsRequest) -> None:
        response = _call(servers.retrieval.SimilarItems, request)
        if response is None:
            return
        ids = _check_candidates(response, request.n, set(request.exclude_item_ids), catalogue)
        assert request.item_id in catalogue, f"similar items of unknown {request.item_id!r}"
        assert request.item_id not in ids, "the item itself was returned"

    similar()
    _assert_alive(servers, dataset)


@st.composite
def query_vector_requests(draw: st.DrawFn, users: list[str], items: list[str]) -> Any:
    request = retrieval_pb2.QueryVectorRequest()
    mode = draw(st.sampled_from(["user_id", "history", "none"]))
    if mode == "user_id":
        request.user_id = draw(user_ids(users, items))
    elif mode == "history":
        item_ids, weights = draw(histories(items))
        request.history.CopyFrom(retrieval_pb2.ItemHistory(item_ids=item_ids, weights=weights))
    return request


def test_query_vector_never_fails_on_the_server_side(servers: Servers, dataset: Dataset) -> None:
    """Step 1 of the sharded scatter-gather: a part of the query vector, finite and of the index dimension."""
    users, items, _ = _pools(dataset)
    dimension = _dimension(servers)

    @FUZZ
    @given(query_vector_requests(users, items))
    def query_vector(request: retrieval_pb2.QueryVectorRequest) -> None:
        response = _call(servers.retrieval.QueryVector, request)
        if response is None:
            return
        mode = request.WhichOneof("query")
        assert mode is not None, "a request without a query was accepted"
        values = list(response.partial.values)
        assert len(values) in (0, dimension), f"a part of {len(values)} values; the index has {dimension}"
        assert all(math.isfinite(value) for value in values), "non-finite values in the part"
        assert (response.known > 0) == bool(values)
        limit = len(request.history.item_ids) if mode == "history" else 1
        assert 0 <= response.known <= limit
        assert (response.shard, response.shard_count) == (0, 1)
        assert response.index_version

    query_vector()
    _assert_alive(servers, dataset)


def test_admin_reload_of_junk_versions_is_refused_cleanly(servers: Servers, dataset: Dataset) -> None:
    """ReloadArtifacts with any version string: refused (or a no-op), never a crash, never a swap."""
    stubs = [admin_pb2_grpc.AdminStub(channel) for channel in servers.channels]
    before = [stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=TIMEOUT_S).serving.version for stub in stubs]
    versions = st.one_of(
        junk_strings(),
        st.sampled_from([".", "..", "../index", "./x", "a/b", "/", "\\", "CURRENT", "index-train", "~", "*"]),
        st.sampled_from(before).map(lambda version: version + "\x00"),
    )

    @settings(FUZZ, max_examples=60)
    @given(st.sampled_from(stubs), versions)
    def reload(stub: admin_pb2_grpc.AdminStub, version: str) -> None:
        response = _call(stub.ReloadArtifacts, admin_pb2.ReloadArtifactsRequest(version=version))
        assert response is None or not response.reloaded, f"version {version!r} was swapped in"

    reload()
    after = [stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=TIMEOUT_S).serving.version for stub in stubs]
    assert after == before
    _assert_alive(servers, dataset)


def test_servers_still_answer_after_fuzzing(servers: Servers, dataset: Dataset) -> None:
    _assert_alive(servers, dataset)
