"""The typed settings of the load test, in the style of :mod:`shared.config`.

Values come, highest priority first, from command-line flags (``python -m deploy.loadtest``),
environment variables ``VITRINE_LOADTEST_<FIELD>`` (nested: ``VITRINE_LOADTEST_TLS__CA_FILE``;
lists and scenarios as JSON), a YAML file named by ``VITRINE_LOADTEST_CONFIG`` and the
defaults below. Everything is validated before the first request is sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shared.config import FileAndEnvSettings, load_with_overrides
from shared.security import ClientTlsSettings

CONFIG_FILE_ENV = "VITRINE_LOADTEST_CONFIG"
# The locust child process receives the resolved settings (secrets included) in this
# variable: process environment, never a file on disk.
RESOLVED_ENV = "VITRINE_LOADTEST_RESOLVED"
# ... and writes its raw per-request records here.
RECORDS_ENV = "VITRINE_LOADTEST_RECORDS"
# ... for this scenario (by name).
SCENARIO_ENV = "VITRINE_LOADTEST_SCENARIO"

ScenarioName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,39}$")]


class RpcMix(BaseModel):
    """Relative weights of the RPCs one simulated client calls (0 leaves an RPC out).

    The two read paths a shop calls (Ranking.Recommend, Retrieval.SimilarItems) and the
    write path its event pipeline calls (Ranking.LogEvents: what users just did).
    """

    model_config = ConfigDict(extra="forbid")

    recommend: float = Field(1.0, ge=0)
    similar_items: float = Field(0.0, ge=0)
    log_events: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _something(self) -> RpcMix:
        if self.recommend + self.similar_items + self.log_events <= 0:
            raise ValueError("every RPC weight is 0: the scenario would send nothing")
        return self

    def weights(self) -> dict[str, float]:
        """RPC name -> weight, only the RPCs that are called."""
        pairs = {"Recommend": self.recommend, "SimilarItems": self.similar_items, "LogEvents": self.log_events}
        return {name: weight for name, weight in pairs.items() if weight > 0}


class Scenario(BaseModel):
    """One locust run.

    ``steady``: ``users`` clients together aiming at ``rate`` requests/s (locust's
    ``constant_throughput`` per client) for ``duration_s``. ``ramp``: closed-loop clients
    (each sends its next request as soon as the last one answered) in ``stages`` of growing
    size, ``stage_s`` each, to find where throughput stops growing (saturation).
    """

    model_config = ConfigDict(extra="forbid")

    name: ScenarioName
    kind: Literal["steady", "ramp"] = "steady"
    description: str = ""
    rpcs: RpcMix = RpcMix()
    # steady
    users: int = Field(4, ge=1, le=10_000)
    rate: float | None = Field(None, gt=0)
    duration_s: float = Field(20.0, gt=0, le=24 * 3600)
    # ramp
    stages: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    stage_s: float = Field(6.0, gt=0, le=3600)
    # Users started per second when the user count changes.
    spawn_rate: float = Field(50.0, gt=0)
    # Requests that start in the first warmup_s seconds (of the run, or of each ramp stage)
    # are left out of the statistics: connection set-up and spawning, not service latency.
    warmup_s: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.kind == "ramp":
            if self.rate is not None:
                raise ValueError(f"scenario {self.name}: a ramp runs closed-loop clients; leave rate unset")
            if sorted(self.stages) != self.stages or len(set(self.stages)) != len(self.stages):
                raise ValueError(f"scenario {self.name}: ramp stages must grow strictly, got {self.stages}")
            if self.warmup_s >= self.stage_s:
                raise ValueError(f"scenario {self.name}: warmup_s must be shorter than stage_s")
        elif self.warmup_s >= self.duration_s:
            raise ValueError(f"scenario {self.name}: warmup_s must be shorter than duration_s")
        return self

    @property
    def total_s(self) -> float:
        return self.stage_s * len(self.stages) if self.kind == "ramp" else self.duration_s

    @property
    def max_users(self) -> int:
        return self.stages[-1] if self.kind == "ramp" else self.users


def default_scenarios() -> list[Scenario]:
    """What ``make loadtest`` runs: about 70 s of load on a 2-core machine."""
    return [
        Scenario(
            name="steady",
            kind="steady",
            description="Recommend at a constant target rate",
            users=8,
            rate=40.0,
            duration_s=20.0,
        ),
        Scenario(
            name="ramp",
            kind="ramp",
            description="closed-loop Recommend clients doubling until throughput stops growing",
            stages=[1, 2, 4, 8, 16],
            stage_s=6.0,
        ),
        Scenario(
            name="mixed",
            kind="steady",
            description="60% Recommend, 25% SimilarItems, 15% LogEvents at a constant target rate",
            rpcs=RpcMix(recommend=0.6, similar_items=0.25, log_events=0.15),
            users=8,
            rate=50.0,
            duration_s=20.0,
        ),
    ]


class LocalRunSettings(BaseModel):
    """``make loadtest``: the small generated dataset and where its files go."""

    model_config = ConfigDict(extra="forbid")

    workdir: Path = Path("var/loadtest")
    items: int = Field(1500, ge=100)
    users: int = Field(600, ge=10)
    events: int = Field(40_000, ge=1000)
    seed: int = 7
    # Free-text queries load the text model into retrieval (~0.5 GB, ~8 s); no scenario uses them.
    text_queries: bool = False
    server_start_timeout_s: float = Field(180.0, gt=0)


class LoadTestSettings(FileAndEnvSettings):
    config_file_env: ClassVar[str] = CONFIG_FILE_ENV
    model_config = SettingsConfigDict(env_prefix="VITRINE_LOADTEST_", env_nested_delimiter="__", extra="forbid")

    # The ranking service (Recommend), host:port. A cluster: the ranking Service or its
    # ingress/load balancer, e.g. "ranking.shop.example:443" with TLS settings.
    target: str = Field("127.0.0.1:50052", min_length=1)
    # The retrieval service (SimilarItems); None: scenarios that call SimilarItems fail to start.
    retrieval_target: str | None = None
    # TLS for both targets (retrieval_tls overrides for retrieval). No ca_file: plaintext,
    # unless system_roots is set (a public certificate behind an ingress).
    tls: ClientTlsSettings = ClientTlsSettings()
    retrieval_tls: ClientTlsSettings | None = None
    system_roots: bool = False
    # Bearer token sent as "authorization: Bearer <token>" (retrieval_token overrides for retrieval).
    token: SecretStr | None = None
    retrieval_token: SecretStr | None = None
    # Where real ids come from: a JSON file {"users": [...], "items": [...]} (see
    # `python -m deploy.loadtest ids`), or the artifact root the services serve.
    ids_file: Path | None = None
    artifacts: Path | None = None
    # Sequential calls per RPC before the first scenario (not measured); any failure stops the run.
    warmup_calls: int = Field(50, ge=0, le=10_000)
    # Per-call deadline; a call past it counts as DEADLINE_EXCEEDED.
    timeout_s: float = Field(2.0, gt=0)
    k: int = Field(10, ge=1)
    similar_n: int = Field(20, ge=1)
    # Events per LogEvents call (one user's recent views, carts, purchases).
    events_per_call: int = Field(3, ge=1, le=1000)
    # Share of Recommend calls for visitors the snapshot has never seen (cold start until
    # LogEvents, which writes only for these visitors, gives them online history).
    unknown_user_share: float = Field(0.05, ge=0, le=1)
    visitors_per_client: int = Field(20, ge=1)
    # Items of the user's own history sent as session context (0: no session context).
    session_items: int = Field(3, ge=0, le=100)
    seed: int = 7
    # One gRPC channel (connection) per simulated client, so a load balancer in front of
    # several ranking pods spreads them; False: all clients of a locust process share one.
    channel_per_user: bool = True
    scenarios: list[Scenario] = Field(default_factory=default_scenarios, min_length=1)
    # Run only these scenarios (by name); empty: all.
    only: list[ScenarioName] = Field(default_factory=list)
    out: Path = Path("benchmarks/results/loadtest.json")
    # Markdown page whose loadtest section is rewritten; None: leave docs alone.
    docs: Path | None = Path("docs/benchmarks.md")
    # Raw records, locust CSVs and logs.
    run_dir: Path = Path("var/loadtest/run")
    local: LocalRunSettings = LocalRunSettings()

    @model_validator(mode="after")
    def _consistent(self) -> LoadTestSettings:
        names = [scenario.name for scenario in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario names must be unique, got {names}")
        unknown = sorted(set(self.only) - set(names))
        if unknown:
            raise ValueError(f"only: no scenario named {unknown}; scenarios are {names}")
        if self.system_roots and self.tls.ca_file is not None:
            raise ValueError("system_roots and tls.ca_file both set: choose the CA to trust")
        return self

    def selected(self) -> list[Scenario]:
        return [scenario for scenario in self.scenarios if not self.only or scenario.name in self.only]

    def scenario(self, name: str) -> Scenario:
        for scenario in self.scenarios:
            if scenario.name == name:
                return scenario
        raise KeyError(f"no scenario named {name!r}")

    def resolved_json(self) -> str:
        """These settings, secrets included, for the locust child process's environment."""
        payload = self.model_dump(mode="json")
        for field in ("token", "retrieval_token"):
            secret = getattr(self, field)
            payload[field] = secret.get_secret_value() if secret is not None else None
        return json.dumps(payload)

    @classmethod
    def from_resolved(cls, text: str) -> LoadTestSettings:
        """The inverse of :meth:`resolved_json` (validated, environment not consulted)."""
        return cls.model_validate_json(text)


class LoadTestSettingsError(ValueError):
    pass


def load_loadtest_settings(**overrides: Any) -> LoadTestSettings:
    """Settings from env and file, with ``overrides`` (nested dicts, None = unset) on top."""
    return load_with_overrides(LoadTestSettings, LoadTestSettingsError, "load-test settings", overrides)
