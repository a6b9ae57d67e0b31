"""Authenticate and authorize: every bad token is a 401 that says why, and never reaches CPI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.auth import MAX_TOKEN_BYTES, audience_matches, bearer_token
from proxy.dev import EmulatedXsuaa
from proxy.errors import InvalidToken, Unauthorized
from proxy.state import PIPELINE
from tests.conftest import Iflow, MakeProxy, bearer

Client = TestClient[web.Request, web.Application]


async def call(proxy: Client, token: str | None, path: str = "/cpi/echo") -> tuple[int, Any]:
    headers = bearer(token) if token is not None else {}
    async with proxy.post(path, data=b"payload", headers=headers) as resp:
        return resp.status, await resp.json() if resp.content_type == "application/json" else None


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_valid_token_passes_to_cpi_as_the_user(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    async with proxy.post(
        "/cpi/echo", data=b"hello", headers=bearer(xsuaa.mint_user_token("alice"))
    ) as resp:
        assert (resp.status, await resp.read()) == (200, b"hello")
        assert resp.headers["x-cpi-subject"] == "alice"
    assert [r.subject for r in iflow.runtime.requests] == ["alice"]


async def test_missing_token_is_401_with_bearer_challenge(proxy: Client, iflow: Iflow) -> None:
    async with proxy.post("/cpi/echo", data=b"x") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.json()
    assert body["error"] == "invalid_request"
    assert "Authorization: Bearer" in body["error_description"]
    assert iflow.runtime.requests == []


def _attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


BAD_TOKENS: dict[str, tuple[Callable[[EmulatedXsuaa], str], str]] = {
    "garbage": (lambda x: "not-a-jwt", "not a well-formed JWT"),
    "two segments": (lambda x: "a.b", "not a well-formed JWT"),
    "expired": (lambda x: x.mint_user_token(expires_in=-120), "expired"),
    "not yet valid": (lambda x: x.mint_user_token(not_before=600), "not valid yet"),
    "wrong audience": (
        lambda x: x.mint_user_token(claims={"aud": ["otherapp!t9"], "cid": "sb-otherapp!t9"}),
        "audience",
    ),
    "wrong zone": (lambda x: x.mint_user_token(claims={"zid": "another-zone"}), "identity zone"),
    "unknown kid": (lambda x: x.mint_user_token(header={"kid": "nope"}), "unknown key id"),
    "no kid": (lambda x: x.mint_user_token(header={"kid": None}), "no usable kid"),
    "non-string kid": (lambda x: x.mint_user_token(header={"kid": 7}), "no usable kid"),
    "attacker key": (lambda x: x.mint_user_token(key=_attacker_key()), "signature does not verify"),
    "alg none": (
        lambda x: b64({"alg": "none", "kid": "key-1"}) + "." + b64({"zid": x.zone_id}) + ".",
        "algorithm 'none'",
    ),
    "alg NoNe": (
        lambda x: b64({"alg": "NoNe", "kid": "key-1"}) + "." + b64({"zid": x.zone_id}) + ".",
        "algorithm 'NoNe'",
    ),
    "foreign jku": (
        lambda x: x.mint_user_token(header={"jku": "https://evil.example/token_keys"}),
        "jku",
    ),
    "crit header": (lambda x: x.mint_user_token(header={"crit": ["exp"]}), "critical header"),
    "oversized": (lambda x: "a" * (MAX_TOKEN_BYTES + 1), "larger than"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_are_401_invalid_token_and_never_forwarded(
    case: str, proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    make, reason = BAD_TOKENS[case]
    async with proxy.post("/cpi/echo", data=b"x", headers=bearer(make(xsuaa))) as resp:
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        body = await resp.json()
    assert body["error"] == "invalid_token"
    assert reason in body["error_description"]
    assert iflow.runtime.requests == []
    assert xsuaa.token_requests == {}


async def test_hs256_signed_with_the_public_key_is_refused(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    public_pem = xsuaa.public_keys()["key-1"].public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = jwt.decode(xsuaa.mint_user_token(), options={"verify_signature": False})
    forged = _hs256(claims, public_pem)
    status, body = await call(proxy, forged)
    assert (status, body["error"]) == (401, "invalid_token")
    assert "algorithm 'HS256'" in body["error_description"]
    assert iflow.runtime.requests == []


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """PyJWT refuses to HMAC with a PEM key, so forge the token by hand, as an attacker would."""
    signing_input = f"{b64({'alg': 'HS256', 'kid': 'key-1', 'typ': 'JWT'})}.{b64(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


async def test_foreign_jku_causes_no_fetch(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    await call(proxy, xsuaa.mint_user_token())  # keys loaded once
    fetches = xsuaa.key_fetches
    token = xsuaa.mint_user_token(header={"jku": "https://evil.example/keys", "kid": "evil"})
    status, _ = await call(proxy, token)
    assert (status, xsuaa.key_fetches) == (401, fetches)


async def test_missing_scope_is_403_naming_the_scope(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    status, body = await call(proxy, xsuaa.mint_user_token(), path="/admin/x")
    assert (status, body["error"]) == (403, "insufficient_scope")
    assert f"{xsuaa.frontend.xsappname}.admin" in body["error_description"]
    assert iflow.runtime.requests == []


async def test_route_without_scope_accepts_any_valid_token(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    token = xsuaa.mint_user_token("carol", role_collections=("CpiTexUser",))
    async with proxy.get("/ro/echo", headers=bearer(token)) as resp:
        assert resp.status == 200


async def test_validated_token_is_not_verified_again(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    """The claims cache answers a repeat token: the very same Claims, no second verification."""
    validator = proxy.app[PIPELINE].validator
    token = xsuaa.mint_user_token()
    first = await validator.validate(token)
    assert await validator.validate(token) is first
    assert await validator.validate(xsuaa.mint_user_token("bob")) is not first


async def test_expiry_tolerates_60_seconds_of_clock_skew(
    proxy: Client, xsuaa: EmulatedXsuaa
) -> None:
    validator = proxy.app[PIPELINE].validator
    assert (await validator.validate(xsuaa.mint_user_token(expires_in=-30))).subject == "alice"
    assert (await validator.validate(xsuaa.mint_user_token(not_before=30))).subject == "alice"
    with pytest.raises(InvalidToken, match="expired"):
        await validator.validate(xsuaa.mint_user_token(expires_in=-90))


async def test_token_xsuaa_refuses_as_assertion_is_401_not_502(
    proxy: Client, xsuaa: EmulatedXsuaa, iflow: Iflow
) -> None:
    """Inside our leeway but expired by XSUAA's clock: the caller needs a new token."""
    status, body = await call(proxy, xsuaa.mint_user_token(expires_in=-30))
    assert (status, body["error"]) == (401, "invalid_token")
    assert "XSUAA refused the user token" in body["error_description"]
    assert iflow.runtime.requests == []


async def test_key_rotation_is_picked_up_with_one_refresh(
    make_proxy: MakeProxy, xsuaa: EmulatedXsuaa
) -> None:
    proxy = await make_proxy(keys_min_refresh=0.001)
    assert (await call(proxy, xsuaa.mint_user_token("alice")))[0] == 200
    before = xsuaa.key_fetches
    xsuaa.rotate_key()
    assert (await call(proxy, xsuaa.mint_user_token("bob")))[0] == 200
    assert xsuaa.key_fetches == before + 1


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        ({"aud": ["sb-app!t1"]}, True),
        ({"aud": "app!t1"}, True),
        ({"aud": ["app!t1.read"]}, True),
        ({"aud": ["app!t1evil"]}, False),
        ({"aud": ["evil.app!t1"]}, False),
        ({"aud": [], "scope": ["app!t1.read"]}, True),
        ({"aud": [], "scope": ["evil.read"]}, False),
        ({"aud": ["other"], "cid": "sb-app!t1"}, True),
        ({}, False),
    ],
)
def test_audience_rule_follows_xssec(claims: dict[str, Any], ok: bool) -> None:
    assert audience_matches(claims, "sb-app!t1", "app!t1") is ok


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ([], Unauthorized),
        (["Basic dXNlcjpwdw=="], Unauthorized),
        (["Bearer "], Unauthorized),
        (["Bearer a", "Bearer b"], InvalidToken),
    ],
)
def test_bearer_header_shapes(values: list[str], error: type[Exception]) -> None:
    with pytest.raises(error):
        bearer_token(values)


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token(["bearer abc"]) == "abc"
    assert bearer_token(["BEARER abc"]) == "abc"


async def test_a_token_xsuaa_refused_is_not_sent_again(proxy: Client, xsuaa: EmulatedXsuaa) -> None:
    """Found by the soak: inside the leeway, an expired token used to cost an XSUAA call each."""
    token = xsuaa.mint_user_token(expires_in=-30)
    for _ in range(5):
        status, body = await call(proxy, token)
        assert (status, body["error"]) == (401, "invalid_token")
    assert sum(xsuaa.token_requests.values()) == 1
