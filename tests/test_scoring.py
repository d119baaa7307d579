"""Compiled ranker trees: same scores as LightGBM, LightGBM until ready or when compiling fails;
the prior is added to the trees' scores by every backend."""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from ranking_service import scoring
from ranking_service.features import FEATURE_NAMES
from ranking_service.scoring import RankerModel, ScorePrior, Scorer, score_prior, wait_for_compiles
from shared.config import RankerBuildSettings

COMPILE_TIMEOUT_S = 60.0


def _booster(path: Path) -> lgb.Booster:
    rng = np.random.default_rng(1)
    features = rng.random((600, 5)).astype(np.float32)
    features[:, 4] = rng.integers(0, 6, 600)  # a categorical column, as item_category / device
    labels = (features[:, 0] * 3 + (features[:, 4] == 2)).astype(np.int32).clip(0, 3)
    data = lgb.Dataset(features, label=labels, group=[30] * 20, categorical_feature=[4])
    params = {"objective": "lambdarank", "num_leaves": 7, "verbose": -1, "min_data_in_leaf": 5, "num_threads": 1}
    booster = lgb.train(params, data, num_boost_round=15)
    booster.save_model(str(path))
    return booster


def test_compiled_trees_reproduce_lightgbm_scores(tmp_path: Path) -> None:
    booster = _booster(tmp_path / "model.txt")
    scorer = Scorer(RankerModel(booster), tmp_path / "model.txt", threads=1, compiled=True)
    values = np.random.default_rng(2).random((500, 5)).astype(np.float32)
    values[:, 4] = np.arange(500) % 7  # includes a category never seen in training
    assert not scorer.ready.is_set()  # nothing compiles before the first request
    expected = np.asarray(booster.predict(values, num_threads=1), dtype=np.float32)
    np.testing.assert_array_equal(scorer.predict(values), expected)  # LightGBM meanwhile
    assert scorer.ready.wait(COMPILE_TIMEOUT_S)
    assert scorer.backend == "lleaves"
    np.testing.assert_array_equal(scorer.predict(values), expected)
    assert scorer.predict(values[:0]).shape == (0,)


def test_lightgbm_answers_when_compiling_is_off_or_fails(tmp_path: Path) -> None:
    booster = _booster(tmp_path / "model.txt")
    values = np.random.default_rng(3).random((20, 5)).astype(np.float32)
    expected = np.asarray(booster.predict(values, num_threads=1), dtype=np.float32)
    off = Scorer(RankerModel(booster), tmp_path / "model.txt", threads=1, compiled=False)
    assert off.ready.is_set()
    assert off.backend == "lightgbm"
    (tmp_path / "broken.txt").write_text("tree\nnot a model\n")
    broken = Scorer(RankerModel(booster), tmp_path / "broken.txt", threads=1, compiled=True)
    broken.start_compiling()
    assert broken.ready.wait(COMPILE_TIMEOUT_S)
    assert broken.backend == "lightgbm"
    np.testing.assert_array_equal(broken.predict(values), expected)
    np.testing.assert_array_equal(off.predict(values), expected)


def test_compiles_run_one_at_a_time_and_a_replaced_models_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hot reloads in a row must not run one compile per superseded model at once."""
    caplog.set_level(logging.INFO, logger="ranking_service.scoring")
    booster = _booster(tmp_path / "model.txt")
    with scoring._COMPILE_TURN:  # another compile is running: both of these queue
        replaced = Scorer(RankerModel(booster), tmp_path / "model.txt", threads=1, compiled=True)
        current = Scorer(RankerModel(booster), tmp_path / "model.txt", threads=1, compiled=True)
        replaced.start_compiling()
        current.start_compiling()
        replaced_ready = replaced.ready
        del replaced  # its model was swapped out before its turn came
        gc.collect()
        time.sleep(0.1)
        assert not current.ready.is_set()  # still waiting for its turn
    assert current.ready.wait(COMPILE_TIMEOUT_S)
    assert current.backend == "lleaves"
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    while "compile skipped" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "compile skipped: its ranker was replaced before its turn" in caplog.text
    assert not replaced_ready.is_set()  # never compiled
    assert caplog.text.count("compiled ranker ready") == 1


def test_every_backend_adds_the_prior_to_the_trees(tmp_path: Path) -> None:
    booster = _booster(tmp_path / "model.txt")
    prior = ScorePrior(FEATURE_NAMES[2], 2.0)  # a column the 5-feature test model has
    values = np.random.default_rng(4).random((50, 5)).astype(np.float32)
    expected = np.asarray(booster.predict(values, num_threads=1)) + 2.0 * values[:, 2]
    compiled = Scorer(RankerModel(booster, prior), tmp_path / "model.txt", threads=1, compiled=True)
    np.testing.assert_allclose(compiled.predict(values), expected, rtol=1e-6)  # LightGBM meanwhile
    assert compiled.ready.wait(COMPILE_TIMEOUT_S)
    assert compiled.backend == "lleaves"
    np.testing.assert_allclose(compiled.predict(values), expected, rtol=1e-6)


def test_prior_from_settings_names_a_feature_or_is_off() -> None:
    assert score_prior(RankerBuildSettings()) == ScorePrior("item_model_relative", 2.0)
    assert score_prior(RankerBuildSettings(prior_feature=None)) is None
    assert score_prior(RankerBuildSettings(prior_weight=0.0)) is None
    with pytest.raises(ValueError, match="'item_model_scor' is not a ranking feature"):
        score_prior(RankerBuildSettings(prior_feature="item_model_scor"))


def test_exit_waits_for_a_running_compile_and_gives_up_after_its_timeout() -> None:
    assert wait_for_compiles(0.0)  # nothing compiling
    compiling, finish = threading.Event(), threading.Event()

    def compile_turn() -> None:
        with scoring._COMPILE_TURN:  # what a compile holds while it runs
            compiling.set()
            finish.wait(10)

    worker = threading.Thread(target=compile_turn)
    worker.start()
    compiling.wait(10)
    assert not wait_for_compiles(0.1)
    finish.set()
    assert wait_for_compiles(10)
    worker.join()
    assert wait_for_compiles(0.0)  # the turn is free again for later compiles
