"""Scoring candidates: a prior plus the ranker's trees, predicted by LightGBM, then by the
same trees compiled to machine code.

The prior (:class:`ScorePrior`, ``ranker_build.prior_feature`` x ``prior_weight``) is where
the trees start from: training passes it to LightGBM as ``init_score``, so the trees learn
corrections to it, and every score adds it back.

The ranker's trees are compiled with lleaves (LLVM) in a background thread started by the
first request, so start-up neither waits for the compiler (15-30 s for 300 trees on a
busy 2-core machine) nor shares the CPU (and the GIL: lleaves parses the model in Python)
with it. Until the compiled model is ready, and whenever
compiling or its self-check fails, LightGBM's own predict answers. Before it is used,
the compiled model must reproduce LightGBM's scores on a probe matrix (within
``MAX_SCORE_DIFFERENCE``): the switch never changes a ranking.

The compiled code lives only in this process (no object file is cached on disk, so no
native code is ever loaded from a writable location).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from ranking_service.features import FEATURE_INDEX, FEATURE_NAMES
from shared.config import RankerBuildSettings
from shared.logs import event

log = logging.getLogger(__name__)

MAX_SCORE_DIFFERENCE = 1e-9
PROBE_ROWS = 256
PROBE_VALUE_RANGE = 30.0
# One compile at a time per process: each takes a core for 10-20 s at a few hundred trees,
# and hot reloads in quick succession would otherwise run one per superseded model at once
# (six of them starved the serving threads into retrieval timeouts in a reload-under-load
# test). A queued compile whose scorer is gone (its model was replaced) is skipped.
_COMPILE_TURN = threading.Lock()


def wait_for_compiles(timeout_s: float) -> bool:
    """Wait until no compile runs (False when one still ran after ``timeout_s``). A serving
    process calls it before it exits: a daemon compile thread still inside LLVM while the
    interpreter finalises can crash it (exit -11 on SIGTERM, seen once in CI)."""
    if not _COMPILE_TURN.acquire(timeout=timeout_s):
        return False
    _COMPILE_TURN.release()
    return True


@dataclass(frozen=True)
class ScorePrior:
    """The score the trees start from: ``weight`` x the feature ``feature``."""

    feature: str
    weight: float

    @property
    def column(self) -> int:
        return FEATURE_INDEX[self.feature]

    def of(self, values: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self.weight * values[:, self.column].astype(np.float64)


def score_prior(settings: RankerBuildSettings) -> ScorePrior | None:
    """The prior of a ranker trained with ``settings`` (None: trees only)."""
    if settings.prior_feature is None or settings.prior_weight == 0:
        return None
    if settings.prior_feature not in FEATURE_INDEX:
        raise ValueError(
            f"ranker_build.prior_feature {settings.prior_feature!r} is not a ranking feature; "
            f"use one of {', '.join(FEATURE_NAMES)} or null"
        )
    return ScorePrior(settings.prior_feature, settings.prior_weight)


@dataclass(frozen=True)
class RankerModel:
    """A trained ranker: its trees and the prior they correct."""

    booster: lgb.Booster
    prior: ScorePrior | None = None
    # False: cold-start requests keep retrieval's order (the build's cold-start gate,
    # ranking_service/training.py: gate_cold_start).
    ranks_cold_start: bool = True

    def prior_scores(self, values: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self.prior.of(values) if self.prior is not None else np.zeros(len(values), np.float64)

    def predict(self, values: npt.NDArray[np.float32], threads: int = 1) -> npt.NDArray[np.float64]:
        """LightGBM's own predict plus the prior."""
        trees = np.asarray(self.booster.predict(values, num_threads=threads), dtype=np.float64)
        return trees + self.prior_scores(values)


Scores = TypeVar("Scores", npt.NDArray[np.float32], npt.NDArray[np.float64])


def in_retrieval_order(scores: Scores) -> Scores:
    """The request's scores handed out by candidate position, best first: the order is
    retrieval's (candidates arrive in it), the scale stays the ranker's."""
    return np.sort(scores)[::-1].copy()


class Scorer:
    def __init__(self, model: RankerModel, model_path: Path | None, threads: int, compiled: bool) -> None:
        self._model = model
        self._booster = model.booster
        self._threads = threads
        self._compiled: Any = None  # lleaves.Model once compiled and checked
        self.ready = threading.Event()  # set once the compile attempt has finished (either way)
        self._model_path = model_path if compiled else None
        self._start_lock = threading.Lock()
        self._started = False
        if self._model_path is None:
            self.ready.set()

    def start_compiling(self) -> None:
        """Compile in the background (once); :attr:`ready` is set when it has finished."""
        with self._start_lock:
            if self._started or self._model_path is None:
                return
            self._started = True
        # The thread holds the scorer weakly, so a replaced model's scorer can go while it waits.
        threading.Thread(
            target=_compile_when_its_turn, args=(weakref.ref(self),), name="ranker-compile", daemon=True
        ).start()

    @property
    def backend(self) -> str:
        return "lleaves" if self._compiled is not None else "lightgbm"

    def predict(self, values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if not len(values):
            return np.zeros(0, dtype=np.float32)
        compiled = self._compiled
        if compiled is None and not self._started:
            self.start_compiling()
        if compiled is not None:
            # lleaves reads float64 rows; LightGBM also compares in double precision.
            trees = np.asarray(compiled.predict(values.astype(np.float64), n_jobs=self._threads), dtype=np.float64)
            return (trees + self._model.prior_scores(values)).astype(np.float32)
        return self._model.predict(values, self._threads).astype(np.float32)

    def compile_now(self) -> None:
        """Compile and check the trees in this thread; :attr:`ready` is set at the end."""
        model_path = self._model_path
        if model_path is None:  # compiled trees are off for this scorer
            self.ready.set()
            return
        started = time.perf_counter()
        try:
            import lleaves

            model = lleaves.Model(model_file=str(model_path))
            model.compile()
            probe = np.random.default_rng(0).uniform(
                -PROBE_VALUE_RANGE, PROBE_VALUE_RANGE, (PROBE_ROWS, self._booster.num_feature())
            )
            probe[:, :] = np.round(probe)  # integral values exercise categorical splits too
            expected = np.asarray(self._booster.predict(probe, num_threads=self._threads))
            difference = float(np.max(np.abs(model.predict(probe, n_jobs=self._threads) - expected)))
            if difference > MAX_SCORE_DIFFERENCE:
                raise ValueError(f"compiled model differs from LightGBM by {difference:g} on the probe")
            self._compiled = model
            event(
                log,
                "compiled ranker ready",
                backend="lleaves",
                compile_s=round(time.perf_counter() - started, 2),
                max_probe_difference=difference,
            )
        except Exception as error:  # any failure: keep LightGBM's own predict
            event(log, "compiled ranker unavailable; using LightGBM predict", level=logging.WARNING, error=str(error))
        finally:
            self.ready.set()


def _compile_when_its_turn(scorer_ref: weakref.ref[Scorer]) -> None:
    with _COMPILE_TURN:
        scorer = scorer_ref()
        if scorer is None:
            event(log, "compile skipped: its ranker was replaced before its turn")
            return
        scorer.compile_now()
