"""The typed settings object: env vars, YAML file, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import SettingsError, load_settings


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.ranking.max_k >= 1
    assert settings.retrieval.max_candidates >= settings.ranking.candidates


def test_env_vars_override_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRINE_RANKING__MAX_K", "25")
    monkeypatch.setenv("VITRINE_RETRIEVAL__NPROBE", "8")
    settings = load_settings()
    assert settings.ranking.max_k == 25
    assert settings.retrieval.nprobe == 8


def test_null_in_an_env_var_sets_an_optional_field_to_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "vitrine.yaml"
    config.write_text("retrieval:\n  nprobe: 8\n")
    monkeypatch.setenv("VITRINE_CONFIG", str(config))
    monkeypatch.setenv("VITRINE_RETRIEVAL__NPROBE", "null")  # over the file's 8
    monkeypatch.setenv("VITRINE_RANKING__METRICS_PORT", "null")  # over the default 9152
    settings = load_settings()
    assert settings.retrieval.nprobe is None
    assert settings.ranking.metrics_port is None
    monkeypatch.setenv("VITRINE_RANKING__MAX_K", "null")  # not optional: refused, naming the field
    with pytest.raises(SettingsError, match=r"ranking\.max_k"):
        load_settings()


def test_yaml_file_then_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "vitrine.yaml"
    config.write_text("ranking:\n  max_k: 40\n  port: 6000\nretrieval:\n  port: 6001\n")
    monkeypatch.setenv("VITRINE_CONFIG", str(config))
    settings = load_settings(ranking={"port": 7000})
    assert settings.ranking.max_k == 40
    assert settings.ranking.port == 7000
    assert settings.retrieval.port == 6001


def test_invalid_values_fail_with_the_field_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRINE_RANKING__MAX_K", "0")
    with pytest.raises(SettingsError, match="max_k"):
        load_settings()


def test_unknown_keys_in_file_are_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "vitrine.yaml"
    config.write_text("rankng:\n  max_k: 40\n")
    monkeypatch.setenv("VITRINE_CONFIG", str(config))
    with pytest.raises(SettingsError, match="rankng"):
        load_settings()


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VITRINE_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(SettingsError, match="no such file"):
        load_settings()
