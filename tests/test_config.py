"""Settings, default-env.json and VCAP_SERVICES bindings: bad input names the setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.bindings import check_url, load_bindings
from proxy.errors import ConfigError
from proxy.settings import Settings, effective_environ, load


def xsuaa_entry(**creds: Any) -> dict[str, Any]:
    base = {
        "clientid": "sb-cpitexxsappname!t1",
        "clientsecret": "frontend-secret",
        "url": "https://sub.authentication.eu10.hana.ondemand.com",
        "uaadomain": "authentication.eu10.hana.ondemand.com",
        "xsappname": "cpitexxsappname!t1",
        "identityzoneid": "zone-1",
    }
    return {
        "label": "xsuaa",
        "name": "cpitex-xsuaa",
        "plan": "application",
        "credentials": {**base, **creds},
    }


def cpi_entry(nested: bool = True, **creds: Any) -> dict[str, Any]:
    oauth = {
        "clientid": "sb-abc!b1|it-rt-sub!b196",
        "clientsecret": "cpi-secret",
        "tokenurl": "https://sub.authentication.eu10.hana.ondemand.com/oauth/token",
        "url": "https://sub.it-cpi018-rt.cfapps.eu10-003.hana.ondemand.com/",
        **creds,
    }
    credentials = {"oauth": oauth} if nested else oauth
    return {
        "label": "it-rt",
        "name": "cpitex-cpi",
        "plan": "integration-flow",
        "credentials": credentials,
    }


def env(*entries: dict[str, Any]) -> dict[str, str]:
    services: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        services.setdefault(e["label"], []).append(e)
    return {"VCAP_SERVICES": json.dumps(services)}


def test_defaults() -> None:
    assert load({}) == Settings()
    assert (Settings().port, Settings().routes_file) == (8080, Path("config/routes.json"))


def test_settings_from_environment() -> None:
    settings = load(
        {"PORT": "9000", "CPI_PROXY_CONFIG": "/etc/r.json", "CPI_PROXY_CACHE_SIZE": "5"}
    )
    assert (settings.port, settings.routes_file, settings.cache_size) == (
        9000,
        Path("/etc/r.json"),
        5,
    )


def test_client_limits_from_environment() -> None:
    settings = load(
        {
            "CPI_PROXY_HEADER_TIMEOUT": "2.5",
            "CPI_PROXY_MAX_CLIENTS": "50",
            "CPI_PROXY_MAX_HEAD_BYTES": "20000",
        }
    )
    assert (settings.header_timeout, settings.max_clients, settings.max_head_bytes) == (
        2.5,
        50,
        20000,
    )
    assert (Settings().header_timeout, Settings().max_clients, Settings().max_head_bytes) == (
        10.0,
        1000,
        65536,
    )
    assert load({"CPI_PROXY_MAX_HEAD_BYTES": str(17 * 1024)}).max_head_bytes == 17408  # the floor
    assert (load({"CPI_PROXY_BODY_TIMEOUT": "7.5"}).body_timeout, Settings().body_timeout) == (
        7.5,
        60.0,
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("PORT", "http", "PORT='http' is not a whole number"),
        ("PORT", "70000", "PORT=70000 is not a TCP port"),
        ("CPI_PROXY_CACHE_SIZE", "0", "CPI_PROXY_CACHE_SIZE='0' must be greater than 0"),
        ("CPI_PROXY_EXCHANGE_TIMEOUT", "soon", "CPI_PROXY_EXCHANGE_TIMEOUT='soon' is not a number"),
        ("CPI_PROXY_LOOP", "trio", "CPI_PROXY_LOOP='trio' is not one of auto, asyncio, uvloop"),
        ("CPI_PROXY_DEBUG", "maybe", "CPI_PROXY_DEBUG='maybe' is not a switch"),
        ("CPI_PROXY_HEADER_TIMEOUT", "0", "CPI_PROXY_HEADER_TIMEOUT='0' must be greater than 0"),
        ("CPI_PROXY_HEADER_TIMEOUT", "-1", "CPI_PROXY_HEADER_TIMEOUT='-1' must be greater than 0"),
        ("CPI_PROXY_HEADER_TIMEOUT", "10s", "CPI_PROXY_HEADER_TIMEOUT='10s' is not a number"),
        ("CPI_PROXY_BODY_TIMEOUT", "0", "CPI_PROXY_BODY_TIMEOUT='0' must be greater than 0"),
        ("CPI_PROXY_BODY_TIMEOUT", "1m", "CPI_PROXY_BODY_TIMEOUT='1m' is not a number"),
        ("CPI_PROXY_MAX_CLIENTS", "0", "CPI_PROXY_MAX_CLIENTS='0' must be greater than 0"),
        ("CPI_PROXY_MAX_CLIENTS", "1e3", "CPI_PROXY_MAX_CLIENTS='1e3' is not a whole number"),
        ("CPI_PROXY_MAX_HEAD_BYTES", "64k", "CPI_PROXY_MAX_HEAD_BYTES='64k' is not a whole number"),
        ("CPI_PROXY_MAX_HEAD_BYTES", "0", "CPI_PROXY_MAX_HEAD_BYTES='0' must be greater than 0"),
        (
            "CPI_PROXY_MAX_HEAD_BYTES",
            "17407",
            "CPI_PROXY_MAX_HEAD_BYTES=17407 is below 17408: a 16 KiB token (the largest the proxy"
            " accepts) with its request line would be refused",
        ),
        (
            "CPI_PROXY_REPLAY_BUDGET",
            "-1",
            "CPI_PROXY_REPLAY_BUDGET='-1' must be greater than or equal to 0",
        ),
    ],
)
def test_bad_settings_name_the_variable(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({key: value})
    assert str(info.value) == message or message in str(info.value)


def test_default_env_json_fills_unset_variables(tmp_path: Path) -> None:
    vcap = {"xsuaa": [xsuaa_entry()]}
    (tmp_path / "default-env.json").write_text(
        json.dumps({"VCAP_SERVICES": vcap, "PORT": 5000, "LOG_LEVEL": "DEBUG"})
    )
    merged = effective_environ({"LOG_LEVEL": "INFO"}, tmp_path)
    assert json.loads(merged["VCAP_SERVICES"]) == vcap
    assert (merged["PORT"], merged["LOG_LEVEL"]) == ("5000", "INFO")


def test_default_env_json_is_ignored_when_vcap_services_is_set(tmp_path: Path) -> None:
    (tmp_path / "default-env.json").write_text(json.dumps({"PORT": 5000}))
    assert effective_environ({"VCAP_SERVICES": "{}"}, tmp_path) == {"VCAP_SERVICES": "{}"}


def test_broken_default_env_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "default-env.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"default-env\.json: not readable JSON"):
        effective_environ({}, tmp_path)


def test_bindings_from_vcap_services_with_nested_oauth() -> None:
    bindings = load_bindings(env(xsuaa_entry(), cpi_entry()))
    assert (
        bindings.xsuaa.jwks_url
        == "https://authentication.eu10.hana.ondemand.com/token_keys?zid=zone-1"
    )
    assert bindings.cpi.url == "https://sub.it-cpi018-rt.cfapps.eu10-003.hana.ondemand.com"
    assert bindings.cpi.clientid == "sb-abc!b1|it-rt-sub!b196"


def test_cpi_credentials_at_top_level_are_accepted() -> None:
    assert (
        load_bindings(env(xsuaa_entry(), cpi_entry(nested=False))).cpi.clientsecret == "cpi-secret"
    )


def test_tenantid_stands_in_for_identityzoneid() -> None:
    entry = xsuaa_entry(tenantid="zone-2")
    del entry["credentials"]["identityzoneid"]
    assert load_bindings(env(entry, cpi_entry())).xsuaa.zone_id == "zone-2"


def test_secrets_stay_out_of_repr() -> None:
    bindings = load_bindings(env(xsuaa_entry(), cpi_entry()))
    assert "secret" not in repr(bindings).replace("clientsecret", "")


def test_services_can_be_chosen_by_name() -> None:
    other = xsuaa_entry(xsappname="other!t1")
    other["name"] = "other-xsuaa"
    bindings = load_bindings(env(xsuaa_entry(), other, cpi_entry()), xsuaa_service="other-xsuaa")
    assert bindings.xsuaa.xsappname == "other!t1"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "VCAP_SERVICES is not set"),
        ({"VCAP_SERVICES": "{"}, "VCAP_SERVICES is not valid JSON"),
        (env(cpi_entry()), "no service with label 'xsuaa'"),
        (env(xsuaa_entry()), "no service with label 'it-rt'"),
        (env(xsuaa_entry(), xsuaa_entry(), cpi_entry()), "several 'xsuaa' services are bound"),
        (env(xsuaa_entry(), cpi_entry(clientsecret="")), "lacks credentials.clientsecret"),
        (env(xsuaa_entry(clientid=""), cpi_entry()), "lacks credentials.clientid"),
        (
            env(xsuaa_entry(uaadomain="https://x/y"), cpi_entry()),
            "uaadomain='https://x/y' must be a host",
        ),
        (
            env(xsuaa_entry(), cpi_entry(tokenurl="http://uaa.example.com/oauth/token")),
            "uses plain http",
        ),
        (env(xsuaa_entry(), cpi_entry(url="ftp://x")), "is not an http(s) URL"),
        (
            env(xsuaa_entry(), {**cpi_entry(), "plan": "api"}),
            "needs a binding of plan integration-flow",
        ),
        (
            env(xsuaa_entry(), cpi_entry(clientsecret=None, certificate="PEM", key="KEY")),
            "are not a PEM certificate and unencrypted key",
        ),
        (
            env(xsuaa_entry(), cpi_entry(clientsecret=None, certificate="PEM")),
            "lacks credentials.key",
        ),
    ],
)
def test_bad_bindings_name_the_problem(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_bindings(environ)
    assert message in str(info.value)


def test_plain_http_is_allowed_on_loopback_only() -> None:
    assert check_url("u", "http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_url("u", "http://localhost:8000") == "http://localhost:8000"
    assert check_url("u", "http://[::1]:8000") == "http://[::1]:8000"
    with pytest.raises(ConfigError):
        check_url("u", "http://10.0.0.1:8000")
