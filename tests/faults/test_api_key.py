"""The API key is read where the ingress runs, from an environment variable or a file the
config names; the config itself never holds it, and a missing key never opens the API."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.config import AppConfig, IngressSettings


def test_key_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_TEST_KEY", "sk-env")
    assert IngressSettings(api_key_env="DISAGG_TEST_KEY").read_api_key() == b"sk-env"
    path = tmp_path / "key"
    path.write_text("sk-file\n")
    settings = IngressSettings(api_key_file=path)
    assert settings.read_api_key() == b"sk-file"
    assert "sk-file" not in repr(settings) + settings.model_dump_json()
    assert IngressSettings().read_api_key() is None  # open only when nothing is named


def test_missing_or_empty_key_is_an_error_not_an_open_api(tmp_path, monkeypatch):
    monkeypatch.delenv("DISAGG_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="DISAGG_TEST_KEY"):
        IngressSettings(api_key_env="DISAGG_TEST_KEY").read_api_key()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        IngressSettings(api_key_file=empty).read_api_key()
    with pytest.raises(FileNotFoundError):
        IngressSettings(api_key_file=tmp_path / "missing").read_api_key()


def test_a_plain_key_in_the_config_is_refused():
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"ingress": {"api_key": "sk-plain"}})
    with pytest.raises(ValidationError, match="not both"):
        IngressSettings(api_key_env="A", api_key_file="/k")
