"""Nothing secret ever reaches the log, at any level, on success or failure."""

from __future__ import annotations

import logging

import pytest

from proxy.dev import EmulatedXsuaa
from tests.conftest import Iflow, MakeProxy, bearer


async def test_no_token_or_secret_in_logs_at_debug(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa, iflow: Iflow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    vcap = xsuaa.vcap_services(iflow.url)
    good = await make_proxy()
    bad_secret = xsuaa.vcap_services(iflow.url)
    bad_secret["it-rt"][0]["credentials"]["oauth"]["clientsecret"] = "wrong-secret-value"
    broken = await make_proxy(vcap=bad_secret)
    tokens = [
        xsuaa.mint_user_token("alice"),
        xsuaa.mint_user_token("bob", role_collections=("FrontendOnly",)),
        xsuaa.mint_user_token("nouaa", role_collections=("NoUaaUser",)),
        xsuaa.mint_user_token(header={"kid": "unknown"}),
        xsuaa.mint_user_token(expires_in=-3600),
    ]
    for client in (good, broken):
        for token in tokens:
            for path in ("/cpi/echo", "/tech/echo"):
                async with client.post(path, data=b"x", headers=bearer(token)) as resp:
                    await resp.read()
    cpi_tokens = [
        t for t in (r.headers.get("Authorization", "") for r in iflow.runtime.requests) if t
    ]
    assert cpi_tokens, "the flows above must have reached CPI"
    secrets = [
        *tokens,
        *(t.removeprefix("Bearer ") for t in cpi_tokens),
        vcap["xsuaa"][0]["credentials"]["clientsecret"],
        vcap["it-rt"][0]["credentials"]["oauth"]["clientsecret"],
        "wrong-secret-value",
    ]
    logged = caplog.text
    assert "token request" in logged  # the failures were logged ...
    leaked = [s[:12] for s in secrets if s in logged or s.split(".")[-1] in logged]
    assert leaked == []  # ... without a token, signature or secret
