"""x509 (mTLS) CPI bindings: the exchange authenticates with the binding's certificate."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp.plugin import AiohttpServer

from proxy.bindings import JWT_BEARER, cert_token_url, load_bindings
from proxy.dev import DevCA, EmulatedXsuaa, make_dev_ca
from proxy.errors import ConfigError
from proxy.tls import mtls_context
from tests.conftest import Iflow, MakeProxy, bearer

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def cert_endpoint(aiohttp_server: AiohttpServer, dev_ca: DevCA, xsuaa: EmulatedXsuaa) -> str:
    server = await aiohttp_server(xsuaa.app_mtls(), ssl=dev_ca.mtls_server_context())
    xsuaa.cert_base_url = f"https://localhost:{server.port}"
    return xsuaa.cert_base_url


async def call(
    proxy: Client, xsuaa: EmulatedXsuaa, path: str = "/cpi/echo"
) -> tuple[int, dict[str, str] | bytes]:
    async with proxy.post(path, data=b"via mtls", headers=bearer(xsuaa.mint_user_token())) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.read()


async def test_exchange_over_mutual_tls_works_end_to_end(
    make_proxy: MakeProxy,
    xsuaa: EmulatedXsuaa,
    iflow: Iflow,
    dev_ca: DevCA,
    cert_endpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cert, key = xsuaa.issue_cpi_client_cert(dev_ca)
    proxy = await make_proxy(vcap=xsuaa.vcap_services_x509(iflow.url, cert, key))
    assert await call(proxy, xsuaa) == (200, b"via mtls")
    assert await call(proxy, xsuaa, "/tech/echo") == (200, b"via mtls")
    assert xsuaa.token_requests == {JWT_BEARER: 1, "client_credentials": 1}
    key_body = key.splitlines()[1]
    assert "PRIVATE KEY" not in caplog.text and key_body not in caplog.text


async def test_certificate_from_another_ca_fails_the_handshake_with_a_clear_502(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, cert_endpoint: str
) -> None:
    stranger = make_dev_ca()
    cert, key = stranger.issue_client_cert(xsuaa.cpi_cert_cn)
    proxy = await make_proxy(vcap=xsuaa.vcap_services_x509(iflow.url, cert, key))
    status, body = await call(proxy, xsuaa)
    assert isinstance(body, dict)
    assert (status, body["error"]) == (502, "token_exchange_failed")
    assert "refused the TLS handshake" in body["error_description"]
    assert "certificate and key" in body["error_description"]
    assert iflow.runtime.requests == []


async def test_valid_certificate_of_another_client_is_401_invalid_client(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, dev_ca: DevCA, cert_endpoint: str
) -> None:
    cert, key = dev_ca.issue_client_cert("someone-else")
    proxy = await make_proxy(vcap=xsuaa.vcap_services_x509(iflow.url, cert, key))
    status, body = await call(proxy, xsuaa)
    assert isinstance(body, dict)
    assert (status, body["error"]) == (502, "token_exchange_failed")
    assert "invalid_client" in body["error_description"]
    assert "certificate and key" in body["error_description"]


async def test_secret_client_without_certificate_is_refused_by_the_cert_endpoint(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, cert_endpoint: str
) -> None:
    vcap = xsuaa.vcap_services(iflow.url)
    vcap["it-rt"][0]["credentials"]["oauth"]["tokenurl"] = f"{cert_endpoint}/oauth/token"
    proxy = await make_proxy(vcap=vcap)
    status, body = await call(proxy, xsuaa)
    assert isinstance(body, dict)
    assert (status, body["error"]) == (503, "token_exchange_unavailable")
    assert "cannot reach XSUAA" in body["error_description"]


def test_no_key_file_is_left_on_disk(dev_ca: DevCA) -> None:
    cert, key = dev_ca.issue_client_cert("cn")
    before = set(Path(tempfile.gettempdir()).iterdir())
    mtls_context(cert, key)
    assert set(Path(tempfile.gettempdir()).iterdir()) == before


def test_x509_binding_loads_without_a_secret_and_masks_its_key(
    xsuaa: EmulatedXsuaa, dev_ca: DevCA
) -> None:
    xsuaa.cert_base_url = "https://cpitex.authentication.cert.eu10.hana.ondemand.com"
    cert, key = xsuaa.issue_cpi_client_cert(dev_ca)
    vcap = xsuaa.vcap_services_x509("https://cpi.example.com", cert, key, x509=(cert, key))
    cpi = load_bindings({"VCAP_SERVICES": json.dumps(vcap)}).cpi
    assert (cpi.x509, cpi.clientsecret) == (True, None)
    assert cpi.tokenurl == f"{xsuaa.cert_base_url}/oauth/token"
    assert "PRIVATE" not in repr(cpi) and "BEGIN" not in repr(cpi)


@pytest.mark.parametrize(
    ("creds", "expected"),
    [
        (
            {"certurl": "https://s.authentication.cert.eu10.hana.ondemand.com/"},
            "https://s.authentication.cert.eu10.hana.ondemand.com/oauth/token",
        ),
        (
            {"tokenurl": "https://s.authentication.eu10.hana.ondemand.com/oauth/token"},
            "https://s.authentication.cert.eu10.hana.ondemand.com/oauth/token",
        ),
        (
            {"tokenurl": "https://s.authentication.cert.eu10.hana.ondemand.com/oauth/token"},
            "https://s.authentication.cert.eu10.hana.ondemand.com/oauth/token",
        ),
    ],
)
def test_certificate_endpoint_is_derived_like_xsuaa_names_it(
    creds: dict[str, str], expected: str
) -> None:
    assert cert_token_url(creds, "it-rt") == expected


def test_unparsable_pem_is_a_start_up_error(xsuaa: EmulatedXsuaa) -> None:
    vcap = xsuaa.vcap_services_x509("https://cpi.example.com", "not a cert", "not a key")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_bindings({"VCAP_SERVICES": json.dumps(vcap)})
