"""A ConnectorSpec (shipped to Ray workers) never holds a secret, in any spelling of its key or inside
a URL value; ordinary settings and the names of environment variables pass."""

from __future__ import annotations

import pytest

from blackbox_rs.distributed.spec import ConnectorSpec
from blackbox_rs.errors import ConfigError
from blackbox_rs.redact import register_secret


@pytest.mark.parametrize("key", ["token", "api_key", "client_secret", "clientSecret", "accessToken", "apiKey",
                                 "APIKey", "X-Api-Key", "x-api-key", "Ocp-Apim-Subscription-Key", "Prediction-Key",
                                 "subscriptionKey", "SAS_TOKEN", "password", "Authorization", "refreshToken",
                                 "account-key", "bearer"])
def test_a_credential_key_in_any_spelling_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match="looks like a credential"):
        ConnectorSpec(name="kserve_v2", settings={"base_url": "http://127.0.0.1:1", key: "s3cr3t-value"})
    with pytest.raises(ConfigError, match="looks like a credential"):  # nested, e.g. transport headers
        ConnectorSpec(name="kserve_v2", settings={"transport": {"headers": {key: "s3cr3t-value"}}})


@pytest.mark.parametrize("url", ["https://user:pw@api.example.com/v1", "https://api.example.com/v1?key=abc123",
                                 "https://x.example.com/m?sig=abcd&se=2026", "https://h.example.com/?access_token=zz",
                                 "https://h.example.com/?apiKey=zz"])
def test_a_url_with_credentials_in_it_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="credential"):
        ConnectorSpec(name="kserve_v2", settings={"base_url": url})
    with pytest.raises(ConfigError, match="credential"):
        ConnectorSpec(name="kserve_v2", settings={"endpoints": [url]})


def test_a_registered_secret_anywhere_in_a_value_is_refused() -> None:
    register_secret("zq-very-secret-9137")
    with pytest.raises(ConfigError, match="registered secret"):
        ConnectorSpec(name="kserve_v2", settings={"model_name": "model-zq-very-secret-9137"})


def test_ordinary_settings_and_env_var_names_pass() -> None:
    spec = ConnectorSpec(name="kserve_v2", settings={
        "base_url": "https://api.example.com/v2?model=resnet&version=3", "model_name": "toy", "max_tokens": 5,
        "bearer_token_env": "MY_TOKEN", "api_key_env": "KEY", "api_key_header": "X-Api-Key", "keyframe": 1,
        "monkey": "x", "input_shape": [3, 8, 8], "tokenizer_path": None})
    assert spec.settings["bearer_token_env"] == "MY_TOKEN"
